"""SwiGLU experts stored as stacked weights, run over the contiguous per-expert slices of a dispatch.

Legend: E experts, D model dim, F expert FFN dim, N routed rows (sorted by expert).

Weights: ``gate_proj [E, F, D]``, ``up_proj [E, F, D]``, ``down_proj [E, D, F]`` — the per-expert
``nn.Linear`` layout stacked, so a Hugging Face checkpoint's ``experts.{e}.*`` tensors load by index
and expert parallelism can shard the leading dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagualu.ops import kernel


class Experts(nn.Module):
    def __init__(self, num_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.gate_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its slice of ``x_ND``; rows must be grouped by expert in ascending order."""
        # Host sync (named): slicing needs the counts on the host. One per layer call.
        counts = counts_E.tolist()
        silu_mul = kernel("silu_mul")
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x = x_ND[start : start + n]
            h = silu_mul(F.linear(x, self.gate_proj[e]), F.linear(x, self.up_proj[e]))
            outs.append(F.linear(h, self.down_proj[e]))
            start += n
        if not outs:
            return x_ND.new_zeros(0, self.dim)
        return torch.cat(outs, dim=0)
