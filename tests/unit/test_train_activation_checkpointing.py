"""Activation checkpointing (``train.activation_checkpointing``): the recomputed forward replays the random
routers' noise, so gradients equal those without it (fp32) for tiny-moe with its default router and with
a noisy router; a recompute that does not replay the noise routes differently (the negative control)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bagualu.models import from_config
from bagualu.train.activation_checkpointing import apply_activation_checkpointing
from bagualu.train.loop import lm_loss
from bagualu.train.recipes import tiny_moe

pytestmark = pytest.mark.unit


def _models(router: str):
    run = tiny_moe()
    cfg = dataclasses.replace(run.model, num_layers=2, vocab_size=512,
                              moe=dataclasses.replace(run.model.moe, router=router))
    ref = from_config(cfg, device="cpu", dtype="float32", seed=0).train()
    return ref, copy.deepcopy(ref), run.train


def _grads(model, ids, t) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ce, aux = lm_loss(model, ids, t)
    (ce + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    return grads


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.mark.parametrize("router", ["softmax_topk", "noisy_topk"])
def test_gradients_equal_without_checkpointing(router):
    ref, ac, t = _models(router)
    assert apply_activation_checkpointing(ac) == 2
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step draws the routers' next noise in both models
        ids = torch.randint(0, 512, (4, 65), generator=g)
        assert _max_rel_diff(_grads(ref, ids, t), _grads(ac, ids, t)) < 1e-6
    calls = [m.calls for m in ref.modules() if hasattr(m, "calls")]
    assert calls == [m.calls for m in ac.modules() if hasattr(m, "calls")]
    assert calls == ([2, 2] if router == "noisy_topk" else [0, 0])


def test_a_recompute_that_does_not_replay_the_noise_gets_other_gradients():
    ref, naive, t = _models("noisy_topk")
    for layer in naive.model.layers:
        layer.forward = lambda *a, _f=layer.forward: checkpoint(_f, *a, use_reentrant=False)
    ids = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0))
    assert _max_rel_diff(_grads(ref, ids, t), _grads(naive, ids, t)) > 1e-3


def test_checkpointed_moe_layers_drop_their_expert_activations_until_backward(monkeypatch):
    """The experts' pre-activations become saved tensors under checkpointing (not pool buffers held by the
    autograd node), so after the forward nothing holds them; the backward recomputes them."""
    import weakref

    from bagualu.moe import experts

    _, ac, t = _models("softmax_topk")
    apply_activation_checkpointing(ac)
    made = []

    def fresh(shape, dtype, device):
        x = torch.empty(shape, dtype=dtype, device=device)
        made.append(weakref.ref(x))
        return x

    monkeypatch.setattr(experts, "_fresh", fresh)
    ids = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0))
    ce, aux = lm_loss(ac, ids, t)
    assert len(made) == 2 * 2  # gate and up pre-activations of both layers
    assert all(r() is None for r in made)
    (ce + aux).backward()
    assert len(made) == 2 * 2 * 2  # recomputed in the backward
