"""config.json dialects (transformers 4.x ``rope_theta``/``rope_scaling`` and 5.x ``rope_parameters``),
RoPE scaling variants, and the errors a broken model directory gives."""

from __future__ import annotations

import json

import pytest
import torch

from hf_models import COMMON, V, rel_err, save_hf_model, transformers

import bagualu.models as bm
from bagualu.models import ModelLoadError

pytestmark = pytest.mark.unit

ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
             "beta_slow": 1.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def _to_v4_dialect(cfg_path, legacy_type_key: bool = False):
    """Rewrite a 5.x config.json by hand into the 4.x dialect real checkpoints carry."""
    raw = json.loads(cfg_path.read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    raw["rope_scaling"] = None if kind == "default" else {("type" if legacy_type_key else "rope_type"): kind, **params}
    cfg_path.write_text(json.dumps(raw))
    return raw


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_scaling_v4_dialect_matches_transformers(tmp_path, kind):
    cfg = transformers.LlamaConfig(intermediate_size=96, max_position_embeddings=16,
                                   rope_parameters={"rope_theta": 10000.0, **ROPES[kind]}, **COMMON)
    hf = save_hf_model(cfg, tmp_path)
    raw = _to_v4_dialect(tmp_path / "config.json", legacy_type_key=(kind == "linear"))
    assert "rope_parameters" not in raw and raw["rope_scaling"]
    model = bm.from_pretrained(tmp_path, device="cpu")
    assert model.config.rope.type == kind
    # 24 > 16 positions: past the original context, where the variants differ most
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5
        # transformers reads our 4.x file identically
        hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert rel_err(model(ids), hf4(ids).logits) < 1e-5


def test_v4_dialect_mixtral_and_qwen2_moe(tmp_path):
    for name, cfg in {
        "mixtral": transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, **COMMON),
        "qwen2": transformers.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                             num_experts_per_tok=2, shared_expert_intermediate_size=48, **COMMON),
    }.items():
        d = tmp_path / name
        hf = save_hf_model(cfg, d)
        _to_v4_dialect(d / "config.json")
        ids = torch.randint(0, V, (1, 7))
        with torch.no_grad():
            assert rel_err(bm.from_pretrained(d, device="cpu")(ids), hf(ids).logits) < 1e-5


def test_save_writes_v4_dialect_and_keeps_unknown_keys(tmp_path):
    cfg = transformers.LlamaConfig(intermediate_size=96, **COMMON)
    save_hf_model(cfg, tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    raw["my_custom_field"] = {"kept": True}
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    bm.from_pretrained(tmp_path / "src", device="cpu").save_pretrained(tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["my_custom_field"] == {"kept": True}
    assert "rope_theta" in out and "rope_parameters" not in out
    assert out["model_type"] == "llama" and out["architectures"] == ["LlamaForCausalLM"]


# ---- errors name the path and the file -------------------------------------------------------------

@pytest.fixture()
def good_dir(tmp_path):
    d = tmp_path / "model"
    save_hf_model(transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, **COMMON), d)
    return d


def _err(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        bm.from_pretrained(path, device="cpu")
    return str(e.value)


def test_missing_directory(tmp_path):
    msg = _err(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    msg = _err(good_dir)
    assert str(good_dir / "config.json") in msg and "missing" in msg


def test_malformed_config_json(good_dir):
    (good_dir / "config.json").write_text("{not json")
    msg = _err(good_dir)
    assert "config.json" in msg and "not valid JSON" in msg


def test_config_missing_required_key(good_dir):
    raw = json.loads((good_dir / "config.json").read_text())
    del raw["hidden_size"]
    (good_dir / "config.json").write_text(json.dumps(raw))
    msg = _err(good_dir)
    assert "config.json" in msg and "'hidden_size'" in msg


def test_unsupported_model_type(good_dir):
    raw = json.loads((good_dir / "config.json").read_text())
    raw["model_type"] = "gpt2"
    (good_dir / "config.json").write_text(json.dumps(raw))
    msg = _err(good_dir)
    assert "'gpt2'" in msg and "llama" in msg and "mixtral" in msg


def test_missing_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    msg = _err(good_dir)
    assert str(good_dir / "model.safetensors") in msg and "missing" in msg


def test_corrupt_weights(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"\x00garbage")
    msg = _err(good_dir)
    assert "model.safetensors" in msg and "not a readable safetensors" in msg


def test_missing_tensor_and_wrong_shape(good_dir):
    from safetensors.torch import load_file, save_file

    f = good_dir / "model.safetensors"
    state = load_file(f)
    state.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    save_file(state, f)
    msg = _err(good_dir)
    assert "model.safetensors" in msg and "model.layers.1.mlp.experts.up_proj" in msg
    state["model.layers.1.block_sparse_moe.experts.2.w3.weight"] = torch.zeros(3, 3)
    save_file(state, f)
    msg = _err(good_dir)
    assert "'model.layers.1.block_sparse_moe.experts.2.w3.weight'" in msg and "(3, 3)" in msg


def test_index_names_a_missing_shard(good_dir):
    bm.from_pretrained(good_dir, device="cpu").save_pretrained(good_dir, max_shard_size="40KB")
    shard = sorted(good_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _err(good_dir)
    assert shard.name in msg and "missing" in msg


def test_config_validation_messages():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        bm.ModelConfig(arch="llama", vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1,
                       num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and num_experts=8"):
        bm.MoEConfig(num_experts=8, top_k=9, ffn_dim=8)
    with pytest.raises(ValueError, match="unknown router 'nope'; known routers: softmax_topk"):
        bm.MoEConfig(num_experts=8, top_k=2, ffn_dim=8, router="nope")


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rotary_rows_from_the_table_equal_the_computed_ones(tmp_path, kind):
    """``Rotary.rows`` (the serving engine's cos/sin: gathered from a cached table, grown on demand) equals
    computing them, bit for bit, for every rope type; dynamic NTK, whose frequencies depend on the length,
    computes."""
    cfg = transformers.LlamaConfig(intermediate_size=96, max_position_embeddings=16,
                                   rope_parameters={"rope_theta": 10000.0, **ROPES[kind]}, **COMMON)
    save_hf_model(cfg, tmp_path)
    rot = bm.from_pretrained(tmp_path, device="cpu").rotary
    for pos in ([0, 5, 7], [3], list(range(200, 300)) + [1], [999, 2]):
        p = torch.tensor(pos)
        for dt in (torch.float32, torch.bfloat16):
            want = rot(p.unsqueeze(0), dt)
            got = rot.rows(p, dt, max(pos) + 1)
            assert torch.equal(got[0], want[0][0]) and torch.equal(got[1], want[1][0])
    assert (rot._tables != {}) == (kind != "dynamic")
    if kind != "dynamic":
        assert rot._tables[(torch.device("cpu"), torch.float32)][0].shape[0] == 1024  # grown by doubling
