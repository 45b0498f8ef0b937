"""The expert-parallel data path: tokens travel to the rank that owns their expert and back.

Legend: T tokens, D model dim, E experts (global), e = E / ep local experts, K top-k, N routes sent,
R rows received, ep = ranks in the expert-parallel group.

    route → counts_E → exchange counts (the one host sync) → permute by destination (sort by expert:
    experts are contiguous per rank, so expert order is destination order) → all-to-all →
    regroup by local expert → [capacity: keep each expert's first C rows] → experts → scatter back
    (dropped rows give zeros) → all-to-all back → un-permute, weight, sum

Rows arrive ordered by (source rank, local expert); the experts want (local expert, source rank):

    arrived:  [s0:e0 | s0:e1 | s1:e0 | s1:e1]   →   regrouped: [s0:e0 | s1:e0 | s0:e1 | s1:e1]

Within one expert the rows are in global token order (source rank, then token), exactly the order one
process sees the concatenated batch in — so capacity drops the same routes. Capacity is decided by
the receiver (it alone sees every source's count), which keeps the count exchange the only host sync;
the cost is that dropped rows still travel. The exchanged counts carry each source's token count, from
which the receiver computes the group capacity.
"""

from __future__ import annotations

import torch

from bagualu.comm.all_to_all import all_to_all, exchange_counts_sync
from bagualu.moe.dispatch import capacity, first_rows, make_dispatch, permute, unpermute_combine
from bagualu.moe.experts import Experts
from bagualu.moe.router import RouterOutput


def regroup_index(counts_se: torch.Tensor, total: int) -> torch.Tensor:
    """Row index that reorders (source, expert)-major rows into (expert, source)-major order."""
    flat = counts_se.reshape(-1)
    starts_se = (torch.cumsum(flat, 0) - flat).view_as(counts_se)
    counts_es, starts_es = counts_se.t().reshape(-1), starts_se.t().reshape(-1)
    seg_start = torch.repeat_interleave(starts_es, counts_es, output_size=total)
    offset_in_seg = torch.arange(total, device=counts_se.device) - torch.repeat_interleave(
        torch.cumsum(counts_es, 0) - counts_es, counts_es, output_size=total)
    return seg_start + offset_in_seg


def expert_parallel(x_TD: torch.Tensor, r: RouterOutput, experts: Experts, num_experts: int, ep: int, group,
                    capacity_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(combined output ``[T, D]``, this rank's routes per global expert ``[E]``, routes dropped here)."""
    T, K = x_TD.shape[0], r.experts_TK.shape[-1]
    e = num_experts // ep
    d = make_dispatch(r.experts_TK, num_experts)
    send_se = d.counts_E.view(ep, e)
    tokens = torch.full((ep, 1), T, dtype=send_se.dtype, device=send_se.device)
    send = torch.cat([send_se, tokens], dim=1)  # [dest rank, e + 1]: counts per expert, then T
    recv = exchange_counts_sync(send, group)  # [source rank, e + 1]
    # Host sync (named): split sizes for the exchange and the experts' slices. The layer's only one.
    send_rows, recv_full = torch.stack([send, recv]).tolist()
    recv_rows = [row[:e] for row in recv_full]
    send_rows = [row[:e] for row in send_rows]
    group_tokens = sum(row[e] for row in recv_full)
    send_splits = [sum(row) for row in send_rows]
    recv_splits = [sum(row) for row in recv_rows]
    local_counts = [sum(recv_rows[s][j] for s in range(ep)) for j in range(e)]
    kept = local_counts
    if capacity_factor is not None:
        c = capacity(capacity_factor, group_tokens, K, num_experts)
        kept = [min(n, c) for n in local_counts]
    R, N = sum(recv_splits), sum(send_splits)

    route_N = d.order_R[:N]
    x_RD = all_to_all(permute(x_TD, route_N, K), send_splits, recv_splits, group)
    idx = regroup_index(recv[:, :e], R)
    if kept != local_counts:
        idx = idx.index_select(0, first_rows(local_counts, kept, idx.device))
    y_kept = experts(x_RD.index_select(0, idx), kept)
    y_RD = y_kept.new_zeros(R, y_kept.shape[-1]).index_copy(0, idx, y_kept)
    y_ND = all_to_all(y_RD, recv_splits, send_splits, group)
    return unpermute_combine(y_ND, r.weights_TK, route_N, T), d.counts_E, sum(local_counts) - sum(kept)
