"""Differentiable sum all-reduce: forward sums over the group, backward sums the incoming gradients.

Used for statistics that must be global (MoE balancing losses) so each rank's loss sees the whole
batch; with the 1/world gradient scale of ``parallel/grad_sync.py`` this is the single-process math.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _AllReduceSum.apply(x, group)
