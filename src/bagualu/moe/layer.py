"""``MoE``: router + stacked experts + optional shared experts, locally or expert-parallel.

Legend: T tokens, D model dim, E experts, K top-k, N routed rows.

    x_TD --router--> (weights_TK, experts_TK) --sort--> x_ND --experts--> y_ND --weight, sum--> y_TD
      \\--shared experts (optionally scaled by sigmoid(shared_expert_gate(x)))-------------------/+

Dropless by default. With ``capacity_factor`` (implied by the ``gshard``/``switch`` routers) each expert
takes at most ⌈factor · T · K / E⌉ routes of its dispatch group — the tokens that meet at one expert
instance: the whole batch in one process, the EP group's concatenated batch under expert parallelism —
earlier tokens first; dropped routes contribute nothing and are counted in ``last_dropped``.

After each call the layer keeps ``last_tokens_per_expert`` (routes the router chose, [E]),
``last_dropped`` and, in training, ``last_aux_losses``: the Switch/GShard load-balancing loss
E · Σ_e f_e · P_e (f_e = routes to e per token, P_e = mean router probability) and the router z-loss
mean(logsumexp(logits)²). Under ``parallelize`` the balancing statistics are summed over all ranks, so
every rank's loss sees the global batch exactly as one process would.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.comm.all_reduce import all_reduce_sum
from bagualu.moe.dispatch import capacity, kept_routes, make_dispatch
from bagualu.moe.infer import local_experts_inference, one_token_experts
from bagualu.moe.local import LocalExperts
from bagualu.moe.ep import expert_parallel
from bagualu.moe.experts import Experts
from bagualu.moe.mlp import MLP
from bagualu.moe.router import CAPACITY_ROUTERS, Router
from bagualu.ops.registry import kernel, serving_path
from bagualu.ops.reference import gemm_via_fp32


class MoE(nn.Module):
    """A sparse MoE feed-forward block. ``y = moe(x)`` for ``x [..., dim]``.

    ``num_shared_experts`` shared experts of ``ffn_dim`` each are one dense MLP of width
    ``shared_ffn_dim`` (default ``num_shared_experts * ffn_dim``), as DeepSeek-MoE fuses them;
    ``shared_expert_gate=True`` scales it by a learned sigmoid gate per token (Qwen2-MoE).
    """

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, *, router: str = "softmax_topk",
                 norm_topk_prob: bool = True, num_groups: int = 1, topk_groups: int = 1,
                 routed_scaling_factor: float = 1.0, num_shared_experts: int = 0, shared_ffn_dim: int | None = None,
                 shared_expert_gate: bool = False, capacity_factor: float | None = None, jitter: float = 1e-2,
                 seed: int = 0, shadow: str | int = "off", schedule: str = "all_to_all"):
        super().__init__()
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.gate = Router(dim, num_experts, top_k, name=router, norm_topk_prob=norm_topk_prob,
                           num_groups=num_groups, topk_groups=topk_groups,
                           routed_scaling_factor=routed_scaling_factor, jitter=jitter, seed=seed)
        if capacity_factor is None:
            capacity_factor = CAPACITY_ROUTERS.get(router)
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be positive (or None for dropless)")
        self.capacity_factor = capacity_factor
        if not (shadow in ("off", "auto") or (isinstance(shadow, int) and shadow >= 0)):
            raise ValueError(f"shadow={shadow!r} must be 'off', 'auto' (cost model) or a number of hot experts")
        if schedule not in ("all_to_all", "pipelined", "auto"):
            raise ValueError(f"schedule={schedule!r} must be 'all_to_all', 'pipelined' or 'auto' (cost model)")
        self.shadow, self.schedule = shadow, schedule  # used under expert parallelism
        # Expert activations for backward live in the workspace pool, held by the autograd node. Activation
        # checkpointing needs them as saved tensors (which its hooks drop and recompute): it sets this False.
        self._pool_activations = True
        self.cost = None  # ShadowCost, measured by parallelize when a choice is 'auto'
        self.last_shadowed: tuple[int, ...] = ()
        self.experts = Experts(num_experts, dim, ffn_dim)
        if shared_ffn_dim is None:
            shared_ffn_dim = num_shared_experts * ffn_dim
        if shared_expert_gate and not shared_ffn_dim:
            raise ValueError("shared_expert_gate=True needs shared experts (num_shared_experts or shared_ffn_dim)")
        self.shared_experts = MLP(dim, shared_ffn_dim) if shared_ffn_dim else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_router_logits: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        # set by shard_experts / parallelize
        self.ep, self.ep_rank, self.ep_group = 1, 0, None
        self.data_rank, self.stats_group, self.stats_world = 0, None, 1

    @property
    def pool_activations(self) -> bool:
        return self._pool_activations

    @pool_activations.setter
    def pool_activations(self, value: bool) -> None:
        self._pool_activations = self.experts.pool_activations = bool(value)

    def shard_experts(self, ep_rank: int, ep: int, group) -> None:
        """Keep experts ``[ep_rank * e, (ep_rank + 1) * e)`` (e = E / ep) and free the others.

        After this, ``forward`` sends tokens to their experts' owners over ``group`` (the EP group).
        """
        if self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by ep={ep}; "
                             f"choose ep among the divisors of {self.num_experts}")
        if self.ep != 1:
            raise RuntimeError("experts are already sharded")
        e = self.num_experts // ep
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(self.experts, name)
            shard = p.detach()[ep_rank * e:(ep_rank + 1) * e].clone()  # clone: the full tensor is freed
            setattr(self.experts, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        self.experts.num_experts = e
        self.ep, self.ep_rank, self.ep_group = ep, ep_rank, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        # global token indices seed the random routers' noise, which only training draws
        token_T = self.data_rank * T + torch.arange(T, device=x.device) if self.training else None
        r = self.gate(x_TD, token_T)
        one = T == 1 and self.ep == 1 and self.capacity_factor is None and serving_path() \
            and not gemm_via_fp32(x_TD.dtype, x_TD.device.type)
        if one:  # batch-1 decode: no dispatch to build, the token's experts are read off the router
            # Host sync (named): the token's expert ids. One per layer call.
            y_TD = one_token_experts(x_TD, r.weights_TK, r.experts_TK[0].tolist(), self.experts)
            counts_E = torch.bincount(r.experts_TK[0], minlength=self.num_experts)
            dropped = 0
        elif self.ep > 1:
            y_TD, counts_E, plan = expert_parallel(
                x_TD, r, self.experts, self.num_experts, self.ep, self.ep_group, ep_rank=self.ep_rank,
                capacity_factor=self.capacity_factor, shadow=self.shadow, schedule=self.schedule, cost=self.cost)
            dropped, self.last_shadowed = plan.dropped, plan.shadow
        else:
            d = make_dispatch(r.experts_TK, self.num_experts)
            counts_E = d.counts_E
            # Host sync (named): the experts slice rows by count. One per layer call.
            counts = counts_E.tolist()
            kept = counts
            if self.capacity_factor is not None:
                c = capacity(self.capacity_factor, T, self.top_k, self.num_experts)
                kept = [min(n, c) for n in counts]
            route_N = kept_routes(d, counts, kept)
            w_N = r.weights_TK.reshape(-1).index_select(0, route_N)
            ex = self.experts
            # serving: small-M GEMMs through kernel("linear"), no autograd (half-precision GEMMs that this
            # platform runs faster on fp32 units keep LocalExperts' fp32 route)
            if serving_path() and not gemm_via_fp32(x_TD.dtype, x_TD.device.type):
                y_TD = local_experts_inference(x_TD, w_N, ex.gate_proj, ex.up_proj, ex.down_proj,
                                               route_N // self.top_k, kept)
            else:
                y_TD = LocalExperts.apply(x_TD, w_N, ex.gate_proj, ex.up_proj, ex.down_proj, route_N // self.top_k,
                                          kept, self.pool_activations)
            dropped = sum(counts) - sum(kept)
        if self.shared_experts is not None:
            s_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                g = self.shared_expert_gate
                # serving: the platform's linear, as the router's logits (fp32 activations over half weights)
                gate_T1 = kernel("linear")(x_TD, g.weight, g.bias) if serving_path() else g(x_TD)
                s_TD = torch.sigmoid(gate_T1) * s_TD
            y_TD = y_TD + s_TD
        self.last_tokens_per_expert = counts_E.detach()
        self.last_router_logits = r.logits_TE.detach()
        self.last_dropped = torch.tensor(dropped)
        if self.training:
            self.last_aux_losses = self._aux_losses(r.logits_TE, counts_E, T)
        return y_TD.reshape(shape)

    def _aux_losses(self, logits_TE: torch.Tensor, counts_E: torch.Tensor, T: int) -> dict[str, torch.Tensor]:
        E = self.num_experts
        up = torch.promote_types(logits_TE.dtype, torch.float32)
        probs_TE = torch.softmax(logits_TE.to(up), dim=-1)
        stats = all_reduce_sum(torch.cat([counts_E.to(up), probs_TE.sum(0)]), self.stats_group)
        tokens = T * self.stats_world
        f_E, p_E = stats[:E] / tokens, stats[E:] / tokens
        z = torch.logsumexp(logits_TE.to(up), dim=-1).square().mean()
        return {"load_balance": E * (f_E * p_E).sum(), "z_loss": z}
