"""Routers (gates): score tokens against experts and pick the top-k.

Legend: T tokens, D model dim, E experts, K top-k, n expert groups.

Each router returns ``RouterOutput`` with fp32 weights; numerics follow the Hugging Face model that uses
the same rule, so loaded checkpoints reproduce ``transformers`` logits:

- ``softmax_topk``: softmax over all experts, then top-k; ``norm_topk_prob`` renormalises the k weights
  (Mixtral, Qwen3-MoE: on; Qwen2-MoE and DeepSeek-MoE v1: off).
- ``topk_softmax``: top-k logits, softmax over just those (mathematically softmax_topk with renorm).
- ``sigmoid_bias``: DeepSeek-V3's sigmoid scores; a per-expert bias (``e_score_correction_bias``, updated
  by ``update_bias`` outside the gradient for aux-loss-free balancing) shifts the *choice* but not the
  weights; optional group-limited choice (a group scores the sum of its two best experts) and
  ``routed_scaling_factor``.
- ``softmax_group``: DeepSeek-V2's fp32 softmax scores; with ``num_groups > 1`` only experts of the
  ``topk_groups`` best groups (a group scores its best expert) may be chosen.
- ``noisy_topk``: Shazeer et al. 2017 — in training, logits + N(0, 1) · softplus(x · W_noise), top-k,
  softmax over the k.
- ``gshard``: top-2 of the softmax, weights renormalised over the two; in training the second expert is
  kept with probability 2·w₂ (GShard's random routing) — a dropped route has expert id −1.
- ``switch``: top-1 of the softmax, weight = its probability; in training the router input is scaled by
  U(1 − ε, 1 + ε) jitter (ε = ``jitter``).

Randomness comes from ``moe/noise.py``, keyed on (seed, call, global token index), so a token routes the
same whether one process or several route the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagualu.moe import noise
from bagualu.ops import kernel
from bagualu.ops.registry import serving_path

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_bias", "softmax_group", "noisy_topk", "gshard", "switch")
CAPACITY_ROUTERS = {"gshard": 2.0, "switch": 1.25}  # routers that imply capacity, with their default factor


@dataclass(frozen=True)
class RouterOutput:
    logits_TE: torch.Tensor  # router logits (model dtype; fp32 for sigmoid_bias and softmax_group)
    weights_TK: torch.Tensor  # fp32 combine weights
    experts_TK: torch.Tensor  # int64 expert ids; -1 = route dropped by the router (gshard)


def _linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """Router logits. Serving (inference mode) uses the platform's ``linear``: on CPU, F.linear's BLAS call
    for a [T, E] product wakes an OpenMP team between decode steps (~240 us per batch-1 call in the engine,
    against ~10 us for the small-M kernel)."""
    if serving_path():
        return kernel("linear")(x_TD, w_ED)
    return F.linear(x_TD, w_ED)


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 routers score in fp32, as transformers does; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_router_name(name: str) -> str:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known routers: {', '.join(ROUTERS)}")
    return name


class Router(nn.Module):
    """Linear gate ``weight [E, D]`` plus the selection rule named by ``name``."""

    def __init__(self, dim: int, num_experts: int, top_k: int, *, name: str = "softmax_topk",
                 norm_topk_prob: bool = True, num_groups: int = 1, topk_groups: int = 1,
                 routed_scaling_factor: float = 1.0, jitter: float = 1e-2, seed: int = 0):
        super().__init__()
        check_router_name(name)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        need_k = {"gshard": 2, "switch": 1}.get(name)
        if need_k is not None and top_k != need_k:
            raise ValueError(f"router {name!r} routes to exactly {need_k} expert(s); got top_k={top_k}")
        if num_experts % num_groups:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_groups={num_groups}")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups={topk_groups} must be between 1 and num_groups={num_groups}")
        self.name, self.num_experts, self.top_k = name, num_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.jitter, self.seed, self.calls = jitter, seed, 0
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        if name == "noisy_topk":
            self.w_noise = nn.Parameter(torch.zeros(num_experts, dim))
        if name == "sigmoid_bias":
            # fp32 always: the bias update rule adds small steps that bf16 would swallow
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, token_T: torch.Tensor | None = None) -> RouterOutput:
        """``token_T``: global token indices for the random routers (default 0..T-1)."""
        rule = getattr(self, "_" + self.name)
        if self.training and self.name in ("noisy_topk", "gshard", "switch"):
            if token_T is None:
                token_T = torch.arange(x_TD.shape[0], device=x_TD.device)
            seed = self.seed * 1_000_003 + self.calls
            self.calls += 1
            return rule(x_TD, seed, token_T)
        return rule(x_TD, None, None)

    # ---- deterministic rules ------------------------------------------------------------------------
    def _softmax_topk(self, x_TD, seed, token_T) -> RouterOutput:
        logits_TE = _linear(x_TD, self.weight)
        weights_TK, experts_TK = torch.topk(torch.softmax(_up(logits_TE), dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, weights_TK, experts_TK)

    def _topk_softmax(self, x_TD, seed, token_T) -> RouterOutput:
        logits_TE = _linear(x_TD, self.weight)
        top_TK, experts_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        return RouterOutput(logits_TE, torch.softmax(_up(top_TK), dim=-1), experts_TK)

    def _sigmoid_bias(self, x_TD, seed, token_T) -> RouterOutput:
        logits_TE = _linear(_up(x_TD), _up(self.weight))
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.num_groups > 1:
            T, E, n = choice_TE.shape[0], self.num_experts, self.num_groups
            group_scores_Tn = choice_TE.view(T, n, E // n).topk(min(2, E // n), dim=-1)[0].sum(dim=-1)
            choice_TE = choice_TE.masked_fill(~self._keep_best_groups(group_scores_Tn), float("-inf"))
        experts_TK = torch.topk(choice_TE, k=self.top_k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(logits_TE, weights_TK * self.routed_scaling_factor, experts_TK)

    def _softmax_group(self, x_TD, seed, token_T) -> RouterOutput:
        logits_TE = _linear(_up(x_TD), _up(self.weight))
        scores_TE = logits_TE.softmax(dim=-1)
        if self.num_groups > 1:
            T, E, n = scores_TE.shape[0], self.num_experts, self.num_groups
            # excluded experts score 0, as transformers does
            group_scores_Tn = scores_TE.view(T, n, E // n).max(dim=-1).values
            scores_TE = scores_TE.masked_fill(~self._keep_best_groups(group_scores_Tn), 0.0)
        weights_TK, experts_TK = torch.topk(scores_TE, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(logits_TE, weights_TK * self.routed_scaling_factor, experts_TK)

    # ---- rules with training-time randomness --------------------------------------------------------
    def _noisy_topk(self, x_TD, seed, token_T) -> RouterOutput:
        logits_TE = _linear(x_TD, self.weight)
        chosen_TE = logits_TE
        if seed is not None:
            std_TE = F.softplus(F.linear(x_TD, self.w_noise))
            chosen_TE = logits_TE + noise.normal(seed, token_T, self.num_experts).to(std_TE.dtype) * std_TE
        top_TK, experts_TK = torch.topk(chosen_TE, self.top_k, dim=-1)
        return RouterOutput(chosen_TE, torch.softmax(_up(top_TK), dim=-1), experts_TK)

    def _gshard(self, x_TD, seed, token_T) -> RouterOutput:
        logits_TE = _linear(x_TD, self.weight)
        top_TK, experts_TK = torch.topk(torch.softmax(_up(logits_TE), dim=-1), 2, dim=-1)
        weights_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        if seed is not None:
            keep_T = noise.uniform(seed, token_T, 1)[:, 0] < 2 * weights_TK[:, 1]
            experts_TK = torch.stack([experts_TK[:, 0], torch.where(keep_T, experts_TK[:, 1], -1)], dim=-1)
        return RouterOutput(logits_TE, weights_TK, experts_TK)

    def _switch(self, x_TD, seed, token_T) -> RouterOutput:
        if seed is not None and self.jitter > 0:
            u_TD = noise.uniform(seed, token_T, x_TD.shape[-1]).to(x_TD.dtype)
            x_TD = x_TD * (1 - self.jitter + 2 * self.jitter * u_TD)
        logits_TE = _linear(x_TD, self.weight)
        weights_TK, experts_TK = torch.topk(torch.softmax(_up(logits_TE), dim=-1), 1, dim=-1)
        return RouterOutput(logits_TE, weights_TK, experts_TK)

    # ---- helpers ------------------------------------------------------------------------------------
    def _keep_best_groups(self, group_scores_Tn: torch.Tensor) -> torch.Tensor:
        """Boolean ``[T, E]``: True for the experts of each token's ``topk_groups`` best-scoring groups."""
        T, n = group_scores_Tn.shape
        group_idx = torch.topk(group_scores_Tn, k=self.topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores_Tn).scatter_(1, group_idx, 1.0)
        return group_mask.unsqueeze(-1).expand(T, n, self.num_experts // n).reshape(T, self.num_experts).bool()

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3's aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded.

        ``b_e += rate · sign(mean load − load_e)``, with the load counted over the whole (global) batch.
        """
        if self.name != "sigmoid_bias":
            raise ValueError(f"update_bias applies to the 'sigmoid_bias' router, not {self.name!r}")
        load = tokens_per_expert_E.float()
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
