"""Variable-size all-to-all with autograd, on public ``torch.distributed.all_to_all_single``.

Rows of ``x`` are laid out by destination rank (``send_splits[r]`` rows for rank r); the result holds
``recv_splits[r]`` rows from rank r, in rank order. The backward pass is the same exchange with the
splits swapped. Splits are host lists: the caller got them from the one count exchange per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bagualu.comm.timing import blocked


def exchange_counts_sync(send_counts: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of a small int64 tensor ``[world, ...]`` (row r goes to rank r); returns what arrives.

    Not a host sync by itself; callers ``.tolist()`` the result — that is the layer's one host sync.
    """
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                    async_op: bool = False):
    """Raw exchange (no autograd). With ``async_op`` returns ``(out, work)``."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    with blocked():
        work = dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group,
                                      async_op=async_op)
    return (out, work) if async_op else out


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
