"""Routers (gates): score tokens against experts and pick the top-k.

Legend: T tokens, D model dim, E experts, K top-k, n expert groups.

Each router returns ``RouterOutput`` with fp32 weights; numerics follow the Hugging Face model that uses
the same rule, so loaded checkpoints reproduce ``transformers`` logits:

- ``softmax_topk``: softmax over all experts, then top-k; ``norm_topk_prob`` renormalises the k weights
  (Mixtral, Qwen3-MoE: on; Qwen2-MoE and DeepSeek-MoE v1: off).
- ``topk_softmax``: top-k logits, softmax over just those (mathematically softmax_topk with renorm).
- ``sigmoid_bias``: DeepSeek-V3's sigmoid scores; a per-expert bias (``e_score_correction_bias``, updated
  outside the gradient for aux-loss-free balancing) shifts the *choice* but not the weights; optional
  group-limited choice (``num_groups``/``topk_groups``; a group scores the sum of its two best experts)
  and ``routed_scaling_factor``.
- ``softmax_group``: DeepSeek-V2's fp32 softmax scores (fp32 logits too); with ``num_groups > 1`` only
  experts of the ``topk_groups`` best groups may be chosen, a group scoring its best expert
  ("group_limited_greedy"; one group is plain "greedy"); weights scaled by ``routed_scaling_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_bias", "softmax_group")


@dataclass(frozen=True)
class RouterOutput:
    logits_TE: torch.Tensor  # raw router logits (model dtype; fp32 for sigmoid_bias and softmax_group)
    weights_TK: torch.Tensor  # fp32 combine weights
    experts_TK: torch.Tensor  # int64 expert ids


def check_router_name(name: str) -> str:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known routers: {', '.join(ROUTERS)}")
    return name


class Router(nn.Module):
    """Linear gate ``weight [E, D]`` plus the selection rule named by ``name``."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        name: str = "softmax_topk",
        norm_topk_prob: bool = True,
        num_groups: int = 1,
        topk_groups: int = 1,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        check_router_name(name)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if num_experts % num_groups:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_groups={num_groups}")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups={topk_groups} must be between 1 and num_groups={num_groups}")
        self.name, self.num_experts, self.top_k = name, num_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        if name == "sigmoid_bias":
            # fp32 always: the bias update rule adds small steps that bf16 would swallow
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if self.name == "sigmoid_bias":
            return self._sigmoid_bias(x_TD)
        if self.name == "softmax_group":
            return self._softmax_group(x_TD)
        logits_TE = F.linear(x_TD, self.weight)
        K = self.top_k
        if self.name == "topk_softmax":
            top_TK, experts_TK = torch.topk(logits_TE, K, dim=-1)
            return RouterOutput(logits_TE, torch.softmax(top_TK.float(), dim=-1), experts_TK)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, K, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, weights_TK, experts_TK)

    def _sigmoid_bias(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.num_groups > 1:
            T, E, n = choice_TE.shape[0], self.num_experts, self.num_groups
            # a group's score is the sum of its two best experts (DeepSeek-V3)
            group_scores_Tn = choice_TE.view(T, n, E // n).topk(min(2, E // n), dim=-1)[0].sum(dim=-1)
            choice_TE = choice_TE.masked_fill(~self._keep_best_groups(group_scores_Tn), float("-inf"))
        experts_TK = torch.topk(choice_TE, k=self.top_k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(logits_TE, weights_TK * self.routed_scaling_factor, experts_TK)

    def _softmax_group(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1)
        if self.num_groups > 1:
            T, E, n = scores_TE.shape[0], self.num_experts, self.num_groups
            # a group's score is its best expert (DeepSeek-V2); excluded experts score 0, as transformers
            group_scores_Tn = scores_TE.view(T, n, E // n).max(dim=-1).values
            scores_TE = scores_TE.masked_fill(~self._keep_best_groups(group_scores_Tn), 0.0)
        weights_TK, experts_TK = torch.topk(scores_TE, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(logits_TE, weights_TK * self.routed_scaling_factor, experts_TK)

    def _keep_best_groups(self, group_scores_Tn: torch.Tensor) -> torch.Tensor:
        """Boolean ``[T, E]``: True for the experts of each token's ``topk_groups`` best-scoring groups."""
        T, n = group_scores_Tn.shape
        group_idx = torch.topk(group_scores_Tn, k=self.topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores_Tn).scatter_(1, group_idx, 1.0)
        return group_mask.unsqueeze(-1).expand(T, n, self.num_experts // n).reshape(T, self.num_experts).bool()
