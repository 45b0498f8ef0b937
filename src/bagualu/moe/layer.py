"""``MoE``: router + stacked experts + optional shared experts, with a sort-based local dispatch.

Legend: T tokens, D model dim, E experts, K top-k, N = T*K routed rows.

    x_TD --router--> (weights_TK, experts_TK) --sort--> x_ND --experts--> y_ND --weight, sum--> y_TD
      \\--shared experts (optionally scaled by sigmoid(shared_expert_gate(x)))-------------------/+

After each call the layer keeps ``last_tokens_per_expert`` (int64 [E]) and the router logits, so
training can compute balancing losses and users can watch expert load.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.moe.dispatch import make_dispatch, permute, unpermute_combine
from bagualu.moe.ep import expert_parallel
from bagualu.moe.experts import Experts
from bagualu.moe.mlp import MLP
from bagualu.moe.router import Router


class MoE(nn.Module):
    """A sparse MoE feed-forward block. ``y = moe(x)`` for ``x [..., dim]``.

    ``num_shared_experts`` shared experts of ``ffn_dim`` each are one dense MLP of width
    ``shared_ffn_dim`` (default ``num_shared_experts * ffn_dim``), as DeepSeek-MoE fuses them;
    ``shared_expert_gate=True`` scales it by a learned sigmoid gate per token (Qwen2-MoE).
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        *,
        router: str = "softmax_topk",
        norm_topk_prob: bool = True,
        num_groups: int = 1,
        topk_groups: int = 1,
        routed_scaling_factor: float = 1.0,
        num_shared_experts: int = 0,
        shared_ffn_dim: int | None = None,
        shared_expert_gate: bool = False,
    ):
        super().__init__()
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.gate = Router(
            dim, num_experts, top_k, name=router, norm_topk_prob=norm_topk_prob, num_groups=num_groups,
            topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
        )
        self.experts = Experts(num_experts, dim, ffn_dim)
        if shared_ffn_dim is None:
            shared_ffn_dim = num_shared_experts * ffn_dim
        if shared_expert_gate and not shared_ffn_dim:
            raise ValueError("shared_expert_gate=True needs shared experts (num_shared_experts or shared_ffn_dim)")
        self.shared_experts = MLP(dim, shared_ffn_dim) if shared_ffn_dim else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_router_logits: torch.Tensor | None = None
        self.ep, self.ep_rank, self.ep_group = 1, 0, None  # set by shard_experts

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
        r = self.gate(x_TD)
        if self.ep > 1:
            y_TD, counts_E = expert_parallel(x_TD, r, self.experts, self.num_experts, self.ep, self.ep_group)
        else:
            d = make_dispatch(r.experts_TK, self.num_experts)
            counts_E = d.counts_E
            # Host sync (named): the experts slice rows by count. One per layer call.
            y_ND = self.experts(permute(x_TD, d), counts_E.tolist())
            y_TD = unpermute_combine(y_ND, r.weights_TK, d, x_TD.shape[0])
        if self.shared_experts is not None:
            s_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                s_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        self.last_tokens_per_expert = counts_E.detach()
        self.last_router_logits = r.logits_TE.detach()
        return y_TD.reshape(shape)
