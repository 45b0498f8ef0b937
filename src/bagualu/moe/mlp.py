"""The dense SwiGLU MLP: a dense model's feed-forward layer and an MoE block's shared expert.

It lives in ``moe`` (L3) so both the MoE block and the models (L4) use the one definition.
Parameter names match Hugging Face (``gate_proj``, ``up_proj``, ``down_proj``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.ops import kernel


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernel("silu_mul")(self.gate_proj(x), self.up_proj(x)))
