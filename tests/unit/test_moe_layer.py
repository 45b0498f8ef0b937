"""The MoE layer against brute-force oracles: routers, dispatch, capacity, aux losses, autograd, errors."""

from __future__ import annotations

import math

import pytest
import torch

from bagualu.moe import ROUTERS, MoE
from bagualu.moe.noise import normal, uniform
from bagualu.ops.reference import moe_experts

pytestmark = pytest.mark.unit
D, FF, E = 16, 24, 8


def make(router="softmax_topk", top_k=2, dtype=torch.float32, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(D, FF, E, top_k, router=router, num_groups=2 if router in ("sigmoid_bias", "softmax_group") else 1,
            **kw)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.4)
    if router == "sigmoid_bias":
        m.gate.e_score_correction_bias.normal_(0, 0.1)
    return m.to(dtype)


def oracle(m: MoE, x: torch.Tensor, T: int | None = None):
    """Route with the layer's own router (same seed/call), then compute experts the brute-force way."""
    m.gate.calls -= 1  # replay the call the layer just made
    r = m.gate(x, torch.arange(x.shape[0]))
    cap = None
    if m.capacity_factor is not None:
        cap = math.ceil(m.capacity_factor * x.shape[0] * m.top_k / m.num_experts)
    y, dropped = moe_experts(x, r.weights_TK, r.experts_TK, m.experts.gate_proj, m.experts.up_proj,
                             m.experts.down_proj, cap)
    if m.shared_experts is not None:
        s = m.shared_experts(x)
        if m.shared_expert_gate is not None:
            s = torch.sigmoid(m.shared_expert_gate(x)) * s
        y = y + s
    return y, dropped


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("shared", [0, 2])
def test_layer_matches_brute_force(router, capacity, shared):
    top_k = {"switch": 1, "gshard": 2}.get(router, 3)
    m = make(router, top_k, capacity_factor=capacity, num_shared_experts=shared, shared_expert_gate=shared > 0)
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode in ("train", "eval"):
            m.train(mode == "train")
            y = m(x)
            want, dropped = oracle(m, x)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
            assert int(m.last_dropped) == dropped
            if capacity is not None:
                assert dropped > 0
            assert int(m.last_tokens_per_expert.sum()) <= 37 * top_k


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias", "gshard", "noisy_topk"])
def test_bf16_close_to_fp32(router):
    x = torch.randn(64, D)
    m32, m16 = make(router), make(router, dtype=torch.bfloat16)
    m32.eval(), m16.eval()
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16()).float()
    same = (m32.gate(x).experts_TK.sort(-1).values == m16.gate(x.bfloat16()).experts_TK.sort(-1).values).all(-1)
    assert same.float().mean() > 0.8  # bf16 may flip near-ties; compare tokens routed identically
    err = (y16[same] - y32[same]).abs().max() / y32[same].abs().max()
    assert err < 2e-2, err


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid_bias", "softmax_group", "noisy_topk",
                                    "gshard", "switch"])
def test_gradients_match_autograd_over_oracle(router):
    m = make(router, {"switch": 1}.get(router, 2), dtype=torch.float64, num_shared_experts=1)
    m.train()
    x = torch.randn(19, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    (y.square().sum() + m.last_aux_losses["load_balance"] + m.last_aux_losses["z_loss"]).backward()
    got = [x.grad] + [p.grad for p in m.parameters()]
    x2 = x.detach().clone().requires_grad_()
    for p in m.parameters():
        p.grad = None
    m.gate.calls -= 1
    r = m.gate(x2, torch.arange(19))
    cap = None if m.capacity_factor is None else math.ceil(m.capacity_factor * 19 * m.top_k / E)
    y2, _ = moe_experts(x2, r.weights_TK, r.experts_TK, m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj,
                        cap)
    y2 = y2 + m.shared_experts(x2)
    probs = torch.softmax(r.logits_TE.double(), -1)
    counts = torch.bincount(r.experts_TK[r.experts_TK >= 0].reshape(-1), minlength=E).double()
    lb = E * ((counts / 19) * probs.mean(0)).sum()
    z = torch.logsumexp(r.logits_TE.double(), -1).square().mean()
    (y2.square().sum() + lb + z).backward()
    want = [x2.grad] + [p.grad for p in m.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_load_balance_loss_equals_transformers():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    m = make("softmax_topk", 2)
    m.train()
    x = torch.randn(50, D)
    m(x)
    ref = load_balancing_loss_func((m.last_router_logits,), E, 2)
    torch.testing.assert_close(m.last_aux_losses["load_balance"], ref.float(), rtol=1e-6, atol=1e-7)
    z = torch.logsumexp(m.last_router_logits, -1).square().mean()
    torch.testing.assert_close(m.last_aux_losses["z_loss"], z)


def test_random_routers_are_split_invariant_and_seeded():
    """A token's noise depends on its global index, not on how the batch is split."""
    t = torch.arange(1000)
    assert torch.equal(uniform(7, t[300:400], 8), uniform(7, t, 8)[300:400])
    assert not torch.equal(uniform(7, t, 8), uniform(8, t, 8))
    u, n = uniform(1, t, 64), normal(1, t, 64)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12 ** -0.5) < 0.01
    assert abs(n.mean().item()) < 0.02 and abs(n.std().item() - 1) < 0.02
    m = make("gshard")
    m.train()
    x = torch.randn(40, D)
    full = m.gate(x, torch.arange(40))
    m.gate.calls -= 1
    second = m.gate(x[20:], torch.arange(20, 40))
    assert torch.equal(full.experts_TK[20:], second.experts_TK)
    assert (full.experts_TK[:, 1] == -1).any()  # random routing dropped some second choices


def test_sigmoid_bias_update_rule():
    m = make("sigmoid_bias")
    before = m.gate.e_score_correction_bias.clone()
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])
    m.gate.update_bias(load, rate=0.01)
    delta = m.gate.e_score_correction_bias - before
    assert delta[0] == pytest.approx(-0.01) and delta[1] == pytest.approx(0.01) and delta[2] == 0


def test_construction_errors_name_the_values():
    with pytest.raises(ValueError, match="unknown router 'top2'; known routers: softmax_topk, topk_softmax"):
        MoE(D, FF, E, 2, router="top2")
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and num_experts=8"):
        MoE(D, FF, E, 9)
    with pytest.raises(ValueError, match="router 'switch' routes to exactly 1 expert"):
        MoE(D, FF, E, 2, router="switch")
    with pytest.raises(ValueError, match="capacity_factor=0 must be positive"):
        MoE(D, FF, E, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by num_groups=3"):
        MoE(D, FF, E, 2, router="sigmoid_bias", num_groups=3)
    with pytest.raises(ValueError, match="shadow='hot' must be 'off', 'auto'"):
        MoE(D, FF, E, 2, shadow="hot")
    with pytest.raises(ValueError, match="schedule='ring' must be 'all_to_all', 'pipelined' or 'auto'"):
        MoE(D, FF, E, 2, schedule="ring")


def test_pooled_buffers_survive_training_then_other_token_counts():
    """Large expert activations come from the workspace pool and go back after the backward; a later call
    with another number of tokens (as a serving engine makes) reuses them with the right shapes."""
    from bagualu.memory import workspace

    torch.manual_seed(0)
    moe = MoE(512, 128, 4, 2)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1100, 512, requires_grad=True)  # 2200 routed rows x 512 x 4 B: above the pool's 4 MiB
    moe(x).sum().backward()
    for T in (1000, 1024, 700):
        with torch.inference_mode():
            xt = torch.randn(T, 512)
            y = moe(xt)
        with torch.no_grad():
            ref, _ = oracle(moe, xt)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="did not come from take"):
        workspace.give(torch.empty(1000, 1100))


def test_pooled_buffer_returned_by_a_finaliser_inside_a_compile_trace():
    """Expert activations go back to the pool from a finaliser, i.e. whenever the garbage collector runs —
    also while torch.compile traces on fake tensors. The real buffer still goes back (no 'Exception
    ignored' and a lost buffer), and the next take reuses it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bagualu.memory import workspace

    workspace.clear()
    t = workspace.take((1024, 1024), torch.float32, torch.device("cpu"))
    ptr = t.data_ptr()
    with FakeTensorMode():
        workspace.give(t)
    del t
    assert workspace.take((1024, 1024), torch.float32, torch.device("cpu")).data_ptr() == ptr
