"""Numerical parity with Hugging Face ``transformers`` for every architecture, in both directions."""

from __future__ import annotations

import pytest
import torch

from hf_models import ARCH_OF, V, hf_configs, rel_err, save_hf_model, transformers

import bagualu.models as bm

pytestmark = pytest.mark.unit
CASES = sorted(hf_configs())
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each HF model saved once per module: {case: (hf_model, dir)}."""
    out = {}
    for case, cfg in hf_configs().items():
        d = tmp_path_factory.mktemp(case)
        out[case] = (save_hf_model(cfg, d), d)
    return out


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(0, V, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
        ids[b, : S - n] = 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_loaded_model_matches_transformers(saved, case):
    hf, d = saved[case]
    model = bm.from_pretrained(d, device="cpu")
    assert model.config.arch == ARCH_OF[case]
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 13), (4, 9)]:
        ids = torch.randint(0, V, shape, generator=g)
        with torch.no_grad():
            ref, out = hf(ids).logits, model(ids)
        assert out.shape == (*shape, V)
        assert rel_err(out, ref) < TOL, f"{case} {shape}: rel err {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("case", CASES)
def test_left_padding_matches_transformers_and_unpadded(saved, case):
    hf, d = saved[case]
    model = bm.from_pretrained(d, device="cpu")
    lengths = [12, 7, 3, 12]
    ids, mask = left_padded(lengths)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # what transformers' generate passes
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    assert torch.isfinite(out).all()
    assert rel_err(out[valid], ref[valid]) < TOL
    # a padded row gives the same logits as that sequence alone
    for b, n in enumerate(lengths):
        with torch.no_grad():
            alone = model(ids[b : b + 1, -n:])
        assert rel_err(out[b, -n:], alone[0]) < TOL


@pytest.mark.parametrize("case", CASES)
def test_saved_by_bagualu_loads_in_transformers(saved, case, tmp_path):
    """bagualu saves (after loading from HF, and from a random init) → transformers loads → same logits."""
    _, d = saved[case]
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    for source in ("loaded", "random"):
        if source == "loaded":
            model = bm.from_pretrained(d, device="cpu")
        else:
            model = bm.from_config(bm.from_pretrained(d, device="cpu").config, device="cpu", seed=7)
        out_dir = tmp_path / source
        model.save_pretrained(out_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        assert rel_err(ours, theirs) < TOL, f"{case}/{source}: {rel_err(ours, theirs):.2e}"
        again = bm.from_pretrained(out_dir, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(again(ids), ours, rtol=0, atol=0)


def test_sharded_save_writes_index_and_round_trips(saved, tmp_path):
    _, d = saved["mixtral"]
    model = bm.from_pretrained(d, device="cpu")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, V, (2, 8))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = model(ids)
        assert rel_err(hf(ids).logits, ref) < TOL
        assert rel_err(bm.from_pretrained(tmp_path, device="cpu")(ids), ref) == 0
    # saving small again replaces the shards and the index with one file
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors*")) == ["model.safetensors"]


def test_bf16_load_is_close(saved):
    hf, d = saved["qwen2_moe"]
    model = bm.from_pretrained(d, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        out, ref = model(ids).float(), hf(ids).logits
    assert rel_err(out, ref) < 5e-2


def test_models_build_on_meta_then_materialise(saved):
    _, d = saved["llama"]
    model = bm.from_pretrained(d, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    cfg = model.config
    with torch.device("meta"):
        meta = bm.CausalLM(cfg)
    assert all(p.is_meta for p in meta.parameters())
