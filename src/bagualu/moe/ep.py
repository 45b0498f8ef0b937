"""The expert-parallel data path: tokens travel to the rank that owns their expert and back.

Legend: T tokens, D model dim, E experts (global), e = E / ep local experts, K top-k, N = T*K rows,
R = rows received, ep = ranks in the expert-parallel group.

    route → counts_E → exchange counts (the one host sync) → permute by destination (sort by expert:
    experts are contiguous per rank, so expert order is destination order) → all-to-all →
    regroup by local expert → experts → un-regroup → all-to-all back → un-permute, weight, sum

Rows arrive ordered by (source rank, local expert); the experts want (local expert, source rank):

    arrived:  [s0:e0 | s0:e1 | s1:e0 | s1:e1]   →   regrouped: [s0:e0 | s1:e0 | s0:e1 | s1:e1]

Within one expert the rows are in global token order (source rank, then token), exactly the order a
single process would see the concatenated batch in.
"""

from __future__ import annotations

import torch

from bagualu.comm.all_to_all import all_to_all, exchange_counts_sync
from bagualu.moe.dispatch import make_dispatch, permute, unpermute_combine
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


def expert_parallel(x_TD: torch.Tensor, r: RouterOutput, experts: Experts, num_experts: int, ep: int,
                    group) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined expert output ``[T, D]`` and this rank's routed counts per global expert ``[E]``."""
    T = x_TD.shape[0]
    e = num_experts // ep
    d = make_dispatch(r.experts_TK, num_experts)
    send_se = d.counts_E.view(ep, e)
    recv_se = exchange_counts_sync(send_se, group)  # [source rank, local expert]
    # Host sync (named): split sizes for the exchange and the experts' slices. The layer's only one.
    send_rows, recv_rows = torch.stack([send_se, recv_se]).tolist()
    send_splits = [sum(row) for row in send_rows]
    recv_splits = [sum(row) for row in recv_rows]
    local_counts = [sum(recv_rows[s][j] for s in range(ep)) for j in range(e)]
    R = sum(recv_splits)

    x_RD = all_to_all(permute(x_TD, d), send_splits, recv_splits, group)
    idx_R = regroup_index(recv_se, R)
    y_RD = experts(x_RD.index_select(0, idx_R), local_counts)
    inv_R = torch.empty_like(idx_R)
    inv_R[idx_R] = torch.arange(R, device=idx_R.device)
    y_ND = all_to_all(y_RD.index_select(0, inv_R), recv_splits, send_splits, group)
    return unpermute_combine(y_ND, r.weights_TK, d, T), d.counts_E
