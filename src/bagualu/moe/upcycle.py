"""``moefy``: upcycle a dense model — every dense SwiGLU ``MLP`` becomes an ``MoE`` whose experts all
start as copies of that MLP (Komatsuzaki et al., "Sparse Upcycling"), so a dense checkpoint continues
training as an MoE.

With a renormalising router (``softmax_topk`` with ``norm_topk_prob``, ``topk_softmax``, ``gshard``
without drops) the upcycled model computes exactly the dense model's function at step 0: identical
experts weighted by weights summing to 1. Other routers scale the output and say so in the docstring
of their rule. The router starts at normal(0, ``router_std``) so experts can diverge.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.moe.layer import MoE
from bagualu.moe.mlp import MLP


def _dense_mlps(model: nn.Module):
    """(parent, attribute name, MLP) for every MLP that is not already inside an MoE (shared experts)."""
    inside_moe = {id(m) for moe in model.modules() if isinstance(moe, MoE) for m in moe.modules()}
    for parent in model.modules():
        if id(parent) in inside_moe:
            continue
        for name, child in parent.named_children():
            if isinstance(child, MLP) and id(child) not in inside_moe:
                yield parent, name, child


@torch.no_grad()
def moefy(model: nn.Module, num_experts: int, top_k: int, *, router: str = "softmax_topk",
          router_std: float = 0.02, seed: int = 0, **moe_kwargs) -> nn.Module:
    """Replace every dense ``MLP`` of ``model`` by an ``MoE`` of ``num_experts`` copies (in place).

    Extra keyword arguments go to ``MoE`` (``norm_topk_prob``, ``capacity_factor``, ...). If the model
    has ``on_moefy(settings)`` (``CausalLM`` does), it is told, so its config describes the new model.
    """
    targets = list(_dense_mlps(model))
    if not targets:
        raise ValueError("moefy found no dense MLP to upcycle (is the model already an MoE?)")
    g = torch.Generator(device="cpu").manual_seed(seed)
    for i, (parent, name, mlp) in enumerate(targets):
        if mlp.gate_proj.bias is not None:
            raise ValueError("moefy needs bias-free MLPs: experts have no biases (mlp_bias=True models cannot "
                             "be upcycled exactly)")
        w = mlp.gate_proj.weight
        F_, D = w.shape
        moe = MoE(D, F_, num_experts, top_k, router=router, seed=seed + i, **moe_kwargs)
        moe.to(device=w.device, dtype=w.dtype)
        moe.experts.gate_proj.copy_(mlp.gate_proj.weight.expand(num_experts, F_, D))
        moe.experts.up_proj.copy_(mlp.up_proj.weight.expand(num_experts, F_, D))
        moe.experts.down_proj.copy_(mlp.down_proj.weight.expand(num_experts, D, F_))
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) * router_std)
        if hasattr(moe.gate, "w_noise"):
            moe.gate.w_noise.zero_()
        moe.train(mlp.training)
        setattr(parent, name, moe)
    if hasattr(model, "on_moefy"):
        model.on_moefy(dict(num_experts=num_experts, top_k=top_k, ffn_dim=F_, router=router, **{
            k: v for k, v in moe_kwargs.items() if k in ("norm_topk_prob", "capacity_factor")}))
    return model
