"""The dense SwiGLU MLP: a dense model's feed-forward layer and an MoE block's shared expert.

It lives in ``moe`` (L3) so both the MoE block and the models (L4) use the one definition.
Parameter names match Hugging Face (``gate_proj``, ``up_proj``, ``down_proj``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.ops import kernel
from bagualu.ops.dense import Linear


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, ffn_dim, bias=bias)
        self.up_proj = Linear(dim, ffn_dim, bias=bias)
        self.down_proj = Linear(ffn_dim, dim, bias=bias)
        self.gate_up_weight: torch.Tensor | None = None
        self.gate_up_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """For inference: gate and up as one ``[2F, D]`` GEMM; the two Linear modules keep views of it
        (see ``Attention.fuse_projections``)."""
        if self.gate_up_weight is not None:
            return
        F_ = self.gate_proj.weight.shape[0]
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        b = torch.cat([self.gate_proj.bias, self.up_proj.bias]) if self.gate_proj.bias is not None else None
        view_parts(w, (self.gate_proj, self.up_proj))
        if b is not None:
            self.gate_proj.bias = nn.Parameter(b[:F_], requires_grad=False)
            self.up_proj.bias = nn.Parameter(b[F_:], requires_grad=False)
        self.gate_up_weight, self.gate_up_bias = w, b

    @torch.no_grad()
    def narrow_projections(self, dtype: torch.dtype) -> None:
        """For inference where the platform's ``linear`` reads ``dtype`` weights as stored (activations and
        biases stay as they are): the fused gate/up weight and ``down_proj``'s in ``dtype``."""
        self.fuse_projections()
        self.gate_up_weight = view_parts(self.gate_up_weight.to(dtype), (self.gate_proj, self.up_proj))
        self.down_proj.weight = nn.Parameter(self.down_proj.weight.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:  # inference (fused): the platform's linear kernel
            lin = kernel("linear")
            gate, up = lin(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
            return lin(kernel("silu_mul")(gate, up), self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(kernel("silu_mul")(self.gate_proj(x), self.up_proj(x)))


def view_parts(w: torch.Tensor, modules) -> torch.Tensor:
    """Give each module (in order) its rows of the fused weight ``w`` as a frozen view; returns ``w``."""
    i = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[i:i + n], requires_grad=False)
        i += n
    return w
