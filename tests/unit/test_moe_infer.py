"""The MoE layer's inference path (``moe/infer.py``, under ``torch.inference_mode``) against the brute-force
oracle and against the training path, and the cases that keep the training path."""

from __future__ import annotations

import pytest
import torch

from bagualu.moe import infer, local
from test_moe_layer import E, make, oracle

pytestmark = pytest.mark.unit


@pytest.fixture
def count_paths(monkeypatch):
    calls = {"infer": 0, "one": 0, "train": 0}
    real_infer, real_one, real_apply = infer.local_experts_inference, infer.one_token_experts, local.LocalExperts.apply

    def counted_infer(*a):
        calls["infer"] += 1
        return real_infer(*a)

    def counted_one(*a):
        calls["one"] += 1
        return real_one(*a)

    def counted_apply(*a):
        calls["train"] += 1
        return real_apply(*a)

    monkeypatch.setattr("bagualu.moe.layer.local_experts_inference", counted_infer)
    monkeypatch.setattr("bagualu.moe.layer.one_token_experts", counted_one)
    monkeypatch.setattr(local.LocalExperts, "apply", counted_apply)
    return calls


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid_bias", "gshard", "switch"])
@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("T", [1, 2, 37])
def test_inference_path_matches_oracle_and_training_path(count_paths, router, capacity, T):
    top_k = {"switch": 1}.get(router, 2)
    m = make(router, top_k, capacity_factor=capacity, num_shared_experts=1).eval()
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(T))
    with torch.inference_mode():
        y = m(x)
        want, dropped = oracle(m, x)
    # one token, dropless: the batch-1 decode path (no dispatch); else the general inference path
    one = T == 1 and capacity is None and router not in ("gshard", "switch")
    assert count_paths == {"infer": int(not one), "one": int(one), "train": 0}
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert int(m.last_dropped) == dropped
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    assert count_paths["train"] == 1


def test_idle_experts_and_training_keep_their_paths(count_paths):
    m = make()
    x = torch.randn(1, 16)
    with torch.inference_mode():  # one token: most experts idle
        y = m.eval()(x)
    assert int((m.last_tokens_per_expert > 0).sum()) == 2 < E
    assert int(m.last_tokens_per_expert.sum()) == 2 and int(m.last_dropped) == 0
    m.train()
    yt = m(x)
    yt.sum().backward()  # the training path, with gradients
    assert count_paths == {"infer": 0, "one": 1, "train": 1}
    torch.testing.assert_close(yt.detach(), y, rtol=1e-5, atol=1e-5)
    assert m.experts.gate_proj.grad is not None


def test_half_precision_on_fp32_gemm_platforms_keeps_the_fp32_route(count_paths, monkeypatch):
    monkeypatch.setattr("bagualu.moe.layer.gemm_via_fp32", lambda dtype, dev: dtype == torch.bfloat16)
    m = make(dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        m(torch.randn(3, 16, dtype=torch.bfloat16))
        m(torch.randn(1, 16, dtype=torch.bfloat16))  # batch-1 decode too
    assert count_paths == {"infer": 0, "one": 0, "train": 2}
