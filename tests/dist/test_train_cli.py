"""``bagualu train`` as a user runs it: 2 processes with EP=2 follow one process step for step (fp32) —
the EP=2 run with activation checkpointing (its recompute repeats the all-to-all inside backward), the
single process without — and the run directory holds the log, the plot and a Hugging Face export
transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import transformers

import bagualu.models as bm

pytestmark = pytest.mark.dist
BAGUALU = str(Path(sys.executable).parent / "bagualu")
COMMON = ["--train.steps=5", "--train.warmup=1", "--train.dtype=float32", "--train.global_batch=8",
          "--model.num_layers=2"]


def train(run_dir: Path, *args: str) -> list[dict]:
    p = subprocess.run([BAGUALU, "train", "--run-dir", str(run_dir), *COMMON, *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_ep2_run_matches_single_process_and_exports(tmp_path):
    ep2 = train(tmp_path / "ep2", "--nproc", "2", "--data.corpus_mb=0.5", "--train.activation_checkpointing=true")
    one = train(tmp_path / "one", "--nproc", "1", f"--data.path={tmp_path / 'ep2' / 'data'}")
    steps2, steps1 = [r for r in ep2 if "step" in r], [r for r in one if "step" in r]
    assert len(steps2) == len(steps1) == 5
    for a, b in zip(steps2, steps1):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] < 1e-4, (a, b)
    assert steps2[-1]["loss"] < steps2[0]["loss"]
    assert abs(ep2[-1]["eval_loss"] - one[-1]["eval_loss"]) < 1e-4
    assert "expert_imbalance" in steps2[0]
    run = tmp_path / "ep2"
    assert (run / "training.png").stat().st_size > 1000 and (run / "config.json").is_file()
    ours = bm.from_pretrained(run / "hf", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = torch.tensor([bm.load_tokenizer(run / "hf").encode("import os\n")])
    with torch.no_grad():
        assert ((ours(ids) - hf(ids).logits).abs().max() / hf(ids).logits.abs().max()).item() < 1e-5


def test_train_errors_are_clear(tmp_path):
    p = subprocess.run([BAGUALU, "train", "--train.lr"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--train.lr needs a value" in p.stderr
    p = subprocess.run([BAGUALU, "train", "--train.nope=1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown setting 'train.nope'" in p.stderr
    p = subprocess.run([BAGUALU, "train", "--nproc", "2", "--run-dir", str(tmp_path / "r"), "--data.path=/no/such/data"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "error (rank 0): data.path=/no/such/data is not a prepared dataset" in p.stderr
    p = subprocess.run([BAGUALU, "train", "mixtral-8x7b", "--nproc", "1", "--run-dir", str(tmp_path / "big")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "GiB per cpu device" in p.stderr and "--nproc" in p.stderr


def test_compiled_training_follows_eager(tmp_path):
    """``--train.compile=powerfusion``: the same losses and gradient norms as eager (fp32, to rounding)."""
    eager = train(tmp_path / "eager", "--nproc", "1", "--data.corpus_mb=0.5")
    comp = train(tmp_path / "pf", "--nproc", "1", f"--data.path={tmp_path / 'eager' / 'data'}",
                 "--train.compile=powerfusion")
    se, sc = [r for r in eager if "step" in r], [r for r in comp if "step" in r]
    assert len(se) == len(sc) == 5
    for a, b in zip(sc, se):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] < 1e-4, (a, b)
    assert abs(comp[-1]["eval_loss"] - eager[-1]["eval_loss"]) < 1e-4
