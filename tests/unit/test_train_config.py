"""Run configuration: recipes, dotted overrides, TOML, the memory check, the LR schedule, Slurm's env."""

from __future__ import annotations

import pytest

from bagualu.launch import adopt_slurm_env
from bagualu.platform.cpu import CpuPlatform
from bagualu.train.config import TrainConfig, apply_overrides
from bagualu.train.loop import _lr_lambda
from bagualu.train.memory import check_fits, estimate_bytes
from bagualu.train.recipes import RECIPES, recipe

pytestmark = pytest.mark.unit


def test_recipes_and_overrides():
    for name in RECIPES:
        assert recipe(name).model.num_layers > 0
    cfg = apply_overrides(recipe("tiny-moe"), {"train.lr": "3e-4", "train.steps": 7, "train.warmup": 1,
                                               "model.num_layers": "2",
                                               "model.qk_norm": "true", "model.head_dim": "none"})
    assert (cfg.train.lr, cfg.train.steps, cfg.model.num_layers, cfg.model.qk_norm, cfg.model.head_dim) == \
        (3e-4, 7, 2, True, None)
    with pytest.raises(ValueError, match="unknown setting 'train.nope'; train has:"):
        apply_overrides(cfg, {"train.nope": 1})
    with pytest.raises(ValueError, match="unknown setting 'bogus.x'"):
        apply_overrides(cfg, {"bogus.x": 1})
    with pytest.raises(ValueError, match="train.steps='many'"):
        apply_overrides(cfg, {"train.steps": "many"})
    with pytest.raises(ValueError, match="train.global_batch=10 is not divisible by train.grad_accum=4"):
        TrainConfig(global_batch=10, grad_accum=4)
    with pytest.raises(ValueError, match="unknown recipe 'gpt5'; known: tiny-moe"):
        recipe("gpt5")


def test_tiny_moe_size_and_memory_check():
    cfg = recipe("tiny-moe")
    est = estimate_bytes(cfg.model, cfg.train, ep=2)
    assert 8e6 < est["params"] < 30e6
    ac = apply_overrides(cfg, {"train.activation_checkpointing": "true"})
    assert estimate_bytes(ac.model, ac.train, ep=2)["activation_bytes"] < est["activation_bytes"] / 3
    big = recipe("mixtral-8x7b")
    with pytest.raises(MemoryError, match=r"needs about \d+\.\d GiB per cpu device .* Use more devices"):
        check_fits(big.model, big.train, ep=1, platform=CpuPlatform, world=1)


def test_lr_schedule():
    f = _lr_lambda(TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert f(55) < f(30)


def test_slurm_env_mapping():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345"}
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("3", "8", "1", "32345")
    assert not adopt_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert not adopt_slurm_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
