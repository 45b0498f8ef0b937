"""The expert-parallel data path: tokens travel to the rank that owns their expert and back.

Legend: T tokens, D model dim, E experts (global), e = E / ep local experts, K top-k, R rows received.

    route → counts_E → all-gather the count matrix (the one host sync) → plan (capacity, shadows; the
    same on every rank, ``ep_plan.py``) → permute my kept routes by destination (expert order is
    destination order) → exchange → experts → exchange back → [+ shadowed experts, computed here with
    broadcast weights] → un-permute, weight, sum

Two exchange schedules with identical results: ``all_to_all`` (one collective each way; rows arrive
(source, expert)-major and are regrouped expert-major for the experts) and ``pipelined`` (FasterMoE's
smart schedule, ``pipeline.py``).

    arrived:  [s0:e0 | s0:e1 | s1:e0 | s1:e1]   →   regrouped: [s0:e0 | s1:e0 | s0:e1 | s1:e1]

Within one expert rows keep global token order (source rank, then token): the single-process order of
the concatenated batch, which is why capacity drops exactly the routes one process would drop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bagualu.comm.all_to_all import all_to_all
from bagualu.moe.dispatch import first_rows, make_dispatch, permute, unpermute_combine
from bagualu.moe.ep_plan import EPPlan, ShadowCost, choose_schedule, make_plan
from bagualu.moe.experts import Experts, SwiGLUExperts
from bagualu.moe.pipeline import PipelinedExperts
from bagualu.moe.router import RouterOutput
from bagualu.moe.shadow import shadow_weights

SCHEDULES = ("all_to_all", "pipelined", "auto")


def regroup_index(counts_se: torch.Tensor, total: int) -> torch.Tensor:
    """Row index that reorders (source, expert)-major rows into (expert, source)-major order."""
    flat = counts_se.reshape(-1)
    starts_se = (torch.cumsum(flat, 0) - flat).view_as(counts_se)
    counts_es, starts_es = counts_se.t().reshape(-1), starts_se.t().reshape(-1)
    seg_start = torch.repeat_interleave(starts_es, counts_es, output_size=total)
    offset_in_seg = torch.arange(total, device=counts_se.device) - torch.repeat_interleave(
        torch.cumsum(counts_es, 0) - counts_es, counts_es, output_size=total)
    return seg_start + offset_in_seg


def gather_counts_sync(counts_E: torch.Tensor, T: int, group, ep: int) -> tuple[list[list[int]], list[int]]:
    """All ranks' routes per expert and token counts. Host sync (named): the MoE layer's only one."""
    mine = torch.cat([counts_E, counts_E.new_tensor([T])])
    rows = [torch.empty_like(mine) for _ in range(ep)]
    dist.all_gather(rows, mine, group=group)
    m = torch.stack(rows).tolist()
    return [row[:-1] for row in m], [row[-1] for row in m]


def _exchange_all_to_all(x_send, experts: Experts, plan: EPPlan, group) -> torch.Tensor:
    ep = plan.ep
    send_splits = [sum(plan.send_counts(d)) for d in range(ep)]
    recv_rows = [plan.recv_counts(s) for s in range(ep)]
    recv_splits = [sum(row) for row in recv_rows]
    R = sum(recv_splits)
    x_RD = all_to_all(x_send, send_splits, recv_splits, group)
    idx = regroup_index(torch.tensor(recv_rows, device=x_send.device), R)
    local_counts = [sum(recv_rows[s][j] for s in range(ep)) for j in range(plan.e)]
    y = experts(x_RD.index_select(0, idx), local_counts)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(R, device=idx.device)
    return all_to_all(y.index_select(0, inv), recv_splits, send_splits, group)


def expert_parallel(x_TD: torch.Tensor, r: RouterOutput, experts: Experts, num_experts: int, ep: int, group, *,
                    ep_rank: int, capacity_factor: float | None = None, shadow: str | int = "off",
                    schedule: str = "all_to_all", cost: ShadowCost | None = None):
    """(combined output ``[T, D]``, this rank's routes per global expert ``[E]``, plan)."""
    T, K = x_TD.shape[0], r.experts_TK.shape[-1]
    d = make_dispatch(r.experts_TK, num_experts)
    counts, tokens = gather_counts_sync(d.counts_E, T, group, ep)
    plan = make_plan(counts, tokens, ep_rank, top_k=K, capacity_factor=capacity_factor, shadow=shadow, cost=cost)
    mine = counts[ep_rank]
    routes = d.order_R.index_select(0, first_rows(mine, plan.exchanged(ep_rank), d.order_R.device))
    x_send = permute(x_TD, routes, K)
    if schedule == "auto":
        schedule = choose_schedule(plan, cost)
    if schedule == "pipelined":
        y = PipelinedExperts.apply(x_send, experts.gate_proj, experts.up_proj, experts.down_proj, plan, group)
    elif schedule == "all_to_all":
        y = _exchange_all_to_all(x_send, experts, plan, group)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if plan.shadow:
        sh_kept = plan.shadowed(ep_rank)
        sh_routes = d.order_R.index_select(0, first_rows(mine, sh_kept, d.order_R.device))
        w = shadow_weights(experts, plan.shadow, ep_rank, group)
        y_sh = SwiGLUExperts.apply(permute(x_TD, sh_routes, K), *w, [sh_kept[x] for x in plan.shadow])
        routes, y = torch.cat([routes, sh_routes]), torch.cat([y, y_sh])
    return unpermute_combine(y, r.weights_TK, routes, T), d.counts_E, plan
