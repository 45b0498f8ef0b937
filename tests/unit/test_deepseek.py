"""DeepSeek-V2/V3 specifics beyond the shared parity suite: MLA with every parameter perturbed, the routers
against transformers' own, real-checkpoint config dialects, multi-token-prediction layers, and errors."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import V, hf_configs, make_hf_model, rel_err, transformers

import bagualu.models as bm
from bagualu.models.config import MLAConfig, ModelConfig, MoEConfig
from bagualu.models.hf.config import config_to_hf, parse_config
from bagualu.moe import Router

pytestmark = pytest.mark.unit
TOL = 1e-5


@pytest.fixture()
def bagualu_log(caplog):
    """bagualu's logger does not propagate to the root; hand its records to caplog."""
    logger = logging.getLogger("bagualu")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _perturbed(case: str, **overrides):
    """An HF model whose biases, norm weights and routing biases are all non-trivial (init leaves them 0 or 1)."""
    cfg = hf_configs()[case]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    hf = make_hf_model(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return hf


@pytest.mark.parametrize("case,overrides", [
    ("deepseek_v3", {"attention_bias": True}),
    ("deepseek_v3-half-rope", {}),
    ("deepseek_v2", {"attention_bias": True}),
])
def test_perturbed_mla_matches_transformers_both_ways(tmp_path, case, overrides):
    hf = _perturbed(case, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    model = bm.from_pretrained(tmp_path / "hf", device="cpu")
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model(ids), ref) < TOL
        model.save_pretrained(tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert rel_err(back(ids).logits, ref) < TOL


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_routers_choose_and_weigh_as_transformers(arch):
    """Many tokens through transformers' router and ours: same experts, same weights (order aside)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, D = 16, 32
    if arch == "deepseek_v2":
        hcfg = transformers.DeepseekV2Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4,
                                             topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             routed_scaling_factor=16.0)
        theirs = DeepseekV2TopkRouter(hcfg)
    else:
        hcfg = transformers.DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4, n_group=4,
                                             topk_group=2)
        theirs = DeepseekV3TopkRouter(hcfg)
    raw = {**hcfg.to_dict(), "model_type": arch}
    m = parse_config(raw).moe
    ours = Router(D, E, m.top_k, name=m.router, norm_topk_prob=m.norm_topk_prob, num_groups=m.num_groups,
                  topk_groups=m.topk_groups, routed_scaling_factor=m.routed_scaling_factor)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(E, D, generator=g))
        ours.weight.copy_(theirs.weight)
        if arch == "deepseek_v3":
            theirs.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
            ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
        x = torch.randn(2000, D, generator=g)
        _, w_ref, idx_ref = theirs(x)
        r = ours(x)
    order_ref, order = idx_ref.argsort(-1), r.experts_TK.argsort(-1)
    assert torch.equal(idx_ref.gather(1, order_ref), r.experts_TK.gather(1, order))
    torch.testing.assert_close(r.weights_TK.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-6, atol=0)


def _real_v3_dialect(d):
    """Rewrite a transformers-5 deepseek_v3 config.json as DeepSeek-V3's own (4.x dialect, remote-code keys)."""
    raw = json.loads((d / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    params.pop("rope_type")
    raw["rope_scaling"] = {"type": "yarn", **params}
    raw.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, ep_size=1, seq_aux=True,
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    raw.pop("qk_head_dim", None)
    (d / "config.json").write_text(json.dumps(raw))


def _add_mtp_layer(d, n_layers: int):
    """Append an MTP module as DeepSeek-V3 ships it: ``model.layers.{n}`` with its own extra tensors."""
    f = d / "model.safetensors"
    state = load_file(f)
    last = n_layers - 1
    for k, t in list(state.items()):
        if k.startswith(f"model.layers.{last}."):
            state[k.replace(f"layers.{last}.", f"layers.{n_layers}.")] = t.clone()
    D = state["model.embed_tokens.weight"].shape[1]
    for name, shape in {"enorm.weight": (D,), "hnorm.weight": (D,), "eh_proj.weight": (D, 2 * D),
                        "shared_head.norm.weight": (D,)}.items():
        state[f"model.layers.{n_layers}.{name}"] = torch.ones(shape)
    save_file(state, f, metadata={"format": "pt"})


def test_real_v3_checkpoint_layout_loads_skips_mtp_and_saves_without_it(tmp_path, bagualu_log):
    cfg = hf_configs()["deepseek_v3"]
    hf = make_hf_model(cfg)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    _real_v3_dialect(src)
    _add_mtp_layer(src, cfg.num_hidden_layers)
    model = bm.from_pretrained(src, device="cpu")
    assert model.config.rope.type == "yarn" and model.config.rope.mscale_all_dim == 0.8
    assert any("skipped checkpoint layers [3]" in r.getMessage() for r in bagualu_log.records)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))  # past the original 16
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < TOL
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 0 and saved["topk_method"] == "noaux_tc"
    assert not any(k.startswith("model.layers.3.") for k in load_file(tmp_path / "out" / "model.safetensors"))


def test_extra_layers_are_still_an_error_without_mtp(tmp_path):
    cfg = hf_configs()["deepseek_v2"]
    make_hf_model(cfg).save_pretrained(tmp_path)
    _add_mtp_layer(tmp_path, cfg.num_hidden_layers)
    with pytest.raises(bm.ModelLoadError, match="unexpected tensor 'model.layers.3"):
        bm.from_pretrained(tmp_path, device="cpu")


def test_moe_layer_freq_and_first_dense_layers():
    raw = {**hf_configs()["deepseek_v2"].to_dict(), "num_hidden_layers": 6, "first_k_dense_replace": 1,
           "moe_layer_freq": 2}
    cfg = parse_config(raw)
    assert cfg.moe_layers == (False, False, True, False, True, False)
    with pytest.raises(ValueError, match="first_k_dense_replace on an MoE layer"):
        config_to_hf(cfg)  # transformers cannot express it


def test_v2_config_values_and_unsupported_topk_method():
    raw = hf_configs()["deepseek_v2"].to_dict()
    cfg = parse_config(raw)
    assert cfg.num_kv_heads == cfg.num_heads and cfg.rope_dim == 8 and cfg.mla.q_lora_rank is None
    assert (cfg.moe.router, cfg.moe.num_groups, cfg.moe.topk_groups) == ("softmax_group", 4, 2)
    with pytest.raises(ValueError, match="topk_method='noaux_tc' is not supported.*greedy, group_limited_greedy"):
        parse_config({**raw, "topk_method": "noaux_tc"})


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v2"])
def test_bf16_load_is_close(tmp_path, case):
    hf = make_hf_model(hf_configs()[case])
    hf.save_pretrained(tmp_path)
    model = bm.from_pretrained(tmp_path, device="cpu", dtype="bfloat16")
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(ids).float(), hf(ids).logits) < 5e-2


def _mla_cfg(**kw) -> ModelConfig:
    base = dict(arch="deepseek_v3", vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=4, mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                          v_head_dim=8))
    return ModelConfig(**{**base, **kw})


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_kv_heads=2 with MLA.*set num_kv_heads=num_heads=4"):
        _mla_cfg(num_kv_heads=2)
    with pytest.raises(ValueError, match="qk_rope_head_dim=7 must be even"):
        MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=7, v_head_dim=8)
    moe = MoEConfig(num_experts=8, top_k=2, ffn_dim=16, router="softmax_topk")
    with pytest.raises(ValueError, match="route with 'sigmoid_bias'.*set moe.router='sigmoid_bias'"):
        config_to_hf(_mla_cfg(moe=moe))
    with pytest.raises(ValueError, match="needs MLA attention"):
        config_to_hf(dataclasses.replace(_mla_cfg(), mla=None))
    with pytest.raises(ValueError, match="does not use MLA"):
        config_to_hf(_mla_cfg(arch="llama"))
    with pytest.raises(ValueError, match="unknown router 'nope'; known routers: .*softmax_group"):
        MoEConfig(num_experts=8, top_k=2, ffn_dim=16, router="nope")


def test_mla_tiny_shapes_and_meta_build():
    cfg = _mla_cfg(mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                 q_lora_rank=24))
    with torch.device("meta"):
        m = bm.CausalLM(cfg)
    attn = m.model.layers[0].self_attn
    assert tuple(attn.kv_b_proj.weight.shape) == (4 * (8 + 12), 16)
    assert tuple(attn.o_proj.weight.shape) == (64, 4 * 12)
    assert m.rotary.inv_freq.shape == (4,)  # rope_dim / 2 frequencies
    model = bm.from_config(cfg, device="cpu")
    out = model(torch.randint(0, V, (2, 5)), attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]))
    assert out.shape == (2, 5, V) and torch.isfinite(out).all()
