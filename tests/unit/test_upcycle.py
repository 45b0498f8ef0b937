"""``moefy``: a dense Llama upcycled into an MoE computes the dense function at step 0, trains as an MoE,
and saves as a Mixtral checkpoint that transformers loads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_models import COMMON, V, rel_err, save_hf_model, transformers

import bagualu.models as bm
from bagualu.moe import MoE, moefy

pytestmark = pytest.mark.unit


@pytest.fixture()
def dense(tmp_path):
    save_hf_model(transformers.LlamaConfig(intermediate_size=96, **COMMON), tmp_path / "dense")
    return tmp_path / "dense"


@pytest.mark.parametrize("router,kw", [("softmax_topk", {}), ("topk_softmax", {}),
                                       ("softmax_topk", {"capacity_factor": 4.0})])
def test_upcycled_model_equals_dense_then_saves_as_mixtral(dense, tmp_path, router, kw):
    model = bm.from_pretrained(dense, device="cpu")
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    moefy(model, num_experts=4, top_k=2, router=router, **kw)
    assert sum(isinstance(m, MoE) for m in model.modules()) == COMMON["num_hidden_layers"]
    assert model.config.arch == "mixtral" and model.config.moe.num_experts == 4
    with torch.no_grad():
        after = model(ids)
    assert rel_err(after, before) < 1e-5
    model.save_pretrained(tmp_path / "moe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert rel_err(hf(ids).logits, after) < 1e-5
        # topk_softmax reloads as Mixtral's softmax → top-k → renormalise: equal math, other rounding
        assert rel_err(bm.from_pretrained(tmp_path / "moe", device="cpu")(ids), after) < 1e-5


def test_upcycled_experts_diverge_with_training(dense):
    model = moefy(bm.from_pretrained(dense, device="cpu"), num_experts=4, top_k=2)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    w = model.model.layers[0].mlp.experts.gate_proj
    assert not torch.allclose(w[0], w[1])


def test_moefy_errors(dense, tmp_path):
    model = moefy(bm.from_pretrained(dense, device="cpu"), num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="found no dense MLP"):
        moefy(model, num_experts=4, top_k=2)
    biased = tmp_path / "biased"
    save_hf_model(transformers.LlamaConfig(intermediate_size=96, mlp_bias=True, **COMMON), biased)
    with pytest.raises(ValueError, match="needs bias-free MLPs"):
        moefy(bm.from_pretrained(biased, device="cpu"), num_experts=4, top_k=2)
    sig = moefy(bm.from_pretrained(dense, device="cpu"), num_experts=4, top_k=2, router="sigmoid_bias")
    with pytest.raises(ValueError, match="cannot save as 'mixtral': Mixtral routes softmax"):
        sig.save_pretrained(tmp_path / "nope")
