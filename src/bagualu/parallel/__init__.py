"""Apply parallelism to a model given a mesh. One documented order:

1. expert parallelism: every ``MoE`` layer keeps its ``ep`` shard of experts (the rest is freed), routes
   with noise keyed on global token indices and sums its balancing statistics over all ranks;
2. replicas agree: replicated parameters are broadcast from rank 0, expert shards from dp rank 0;
3. MoDa gradient synchronisation hooks (``grad_sync.py``).

Model code knows nothing of this; ``parallelize`` returns the same module, changed in place, with
``model.grad_sync`` (``no_sync()`` for gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from bagualu.comm.mesh import Axis, Mesh
from bagualu.moe.layer import MoE
from bagualu.parallel.grad_sync import GradSync, install_grad_sync


def parallelize(model: nn.Module, mesh: Mesh, *, bucket_bytes: int = 25 << 20) -> nn.Module:
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moes:
        if m.num_experts % mesh.ep:
            raise ValueError(f"num_experts={m.num_experts} is not divisible by ep={mesh.ep}; "
                             f"choose ep among the divisors of {m.num_experts}")
    for m in moes:
        if mesh.ep > 1:
            m.shard_experts(mesh.ep_rank, mesh.ep, mesh.group(Axis.EP))
        # routing noise keyed on global token index; balancing statistics over the global batch
        m.data_rank = mesh.rank
        m.stats_group = mesh.world_group if mesh.world_size > 1 else None
        m.stats_world = mesh.world_size
    if mesh.ep > 1 and any("auto" in (m.shadow, m.schedule) for m in moes):
        _install_cost_models(moes, mesh)
    expert_params = {id(p) for m in moes for p in m.experts.parameters()}
    if mesh.world_size > 1:
        _broadcast_replicas(model, mesh, expert_params)
    model.grad_sync = install_grad_sync(
        model, expert_params=expert_params, expert_group=mesh.group(Axis.DP), world_group=mesh.world_group
        if mesh.world_size > 1 else None, world=mesh.world_size, bucket_bytes=bucket_bytes)
    return model


def _install_cost_models(moes: list[MoE], mesh: Mesh) -> None:
    """FasterMoE's cost model inputs: measured all-to-all bandwidth, the platform's expert FLOP/s."""
    from bagualu.comm.bandwidth import all_to_all_bandwidth
    from bagualu.moe.ep_plan import ShadowCost
    from bagualu.platform import current_platform

    plat = current_platform()
    group = mesh.group(Axis.EP)
    link_bw = all_to_all_bandwidth(group, device=plat.current_device())
    dtype = moes[0].experts.gate_proj.dtype
    # every rank of the EP group must plan identically: agree on the slowest rank's figure
    flops = torch.tensor([0.7 * plat.peak_flops(dtype)], dtype=torch.float64)
    dist.all_reduce(flops, op=dist.ReduceOp.MIN, group=group)
    for m in moes:
        size = m.experts.gate_proj.element_size()
        D, F_ = m.dim, m.experts.ffn_dim
        m.cost = ShadowCost(row_bytes=4 * D * size, row_flops=18 * D * F_, expert_bytes=3 * D * F_ * size,
                            link_bw=link_bw, flops=float(flops))


@torch.no_grad()
def _broadcast_replicas(model: nn.Module, mesh: Mesh, expert_params: set[int]) -> None:
    dp_group = mesh.group(Axis.DP)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in expert_params:
            if dp_group is not None:
                dist.broadcast(t, src=mesh.ep_rank, group=dp_group)  # global rank of dp rank 0 of this shard
        else:
            dist.broadcast(t, src=0, group=mesh.world_group)


__all__ = ["parallelize", "GradSync"]
