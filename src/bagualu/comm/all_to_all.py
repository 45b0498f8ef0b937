"""Variable-size all-to-all with autograd, on public ``torch.distributed.all_to_all_single``.

Rows of ``x`` are laid out by destination rank (``send_splits[r]`` rows for rank r); the result holds
``recv_splits[r]`` rows from rank r, in rank order. The backward pass is the same exchange with the
splits swapped. Splits are host lists: the caller got them from the one count exchange per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bagualu.comm.timing import blocked


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Raw exchange (no autograd)."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    with blocked():
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return all_to_all_rows(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return all_to_all_rows(grad.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Differentiable variable all-to-all over ``group`` (identity when the group is None)."""
    if group is None:
        return x
    return _AllToAll.apply(x, send_splits, recv_splits, group)
