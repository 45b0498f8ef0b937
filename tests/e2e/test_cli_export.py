"""``bagualu export`` as a user runs it: checkpoints written by 2 ranks with EP=2 (each rank its experts)
export in one process to a Hugging Face directory whose logits equal the trained model's — in
``bagualu.models`` and in ``transformers`` — for the newest or a chosen step; torn, unknown and missing
checkpoints are clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import transformers

import bagualu.models as bm
from bagualu.cli.main import main

pytestmark = pytest.mark.e2e
BAGUALU = str(Path(sys.executable).parent / "bagualu")


def bagualu(*args: str, ok: bool = True, capsys=None):
    """The CLI in this process (its imports are paid once); ``capsys`` captures what it prints."""
    rc = main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    if ok:
        assert rc == 0, (out.out + out.err)[-3000:] if out else rc
    return rc, out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps with EP=2 over 2 processes, checkpoints at steps 2 and 4; ``hf/`` is the live model's export."""
    root = tmp_path_factory.mktemp("export")
    bagualu("data", "prepare", "--out", root / "data", "--max-mb", "0.3", "--vocab-size", "512")
    p = subprocess.run([BAGUALU, "train", "--run-dir", str(root / "run"), "--nproc", "2", f"--data.path={root / 'data'}",
                        "--train.steps=4", "--train.warmup=1", "--train.global_batch=4", "--train.seq_len=64",
                        "--model.num_layers=2", "--train.eval_windows=4", "--train.checkpoint_every=2",
                        "--train.dtype=float32"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root / "run"


def logits(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([bm.load_tokenizer(model_dir).encode("def main(argv):\n    return 0\n")])
    with torch.no_grad():
        ours = bm.from_pretrained(model_dir, device="cpu")(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits
    return ours, hf


def test_export_newest_and_chosen_step_match_the_trained_model(run, tmp_path, capsys):
    _, out = bagualu("export", run, tmp_path / "newest", capsys=capsys)
    assert "exported step 4 (mixtral" in out.out
    assert json.loads((tmp_path / "newest" / "config.json").read_text())["num_local_experts"] == 8
    ours, hf = logits(tmp_path / "newest")
    trained, _ = logits(run / "hf")  # written by the training run from its live (EP-sharded) weights
    assert torch.equal(ours, trained)
    assert ((ours - hf).abs().max() / hf.abs().max()).item() < 1e-5
    bagualu("export", run, tmp_path / "step2", "--step", "2")
    ours2, hf2 = logits(tmp_path / "step2")
    assert ((ours2 - hf2).abs().max() / hf2.abs().max()).item() < 1e-5
    assert not torch.allclose(ours2, ours)  # two more training steps changed the weights


def test_export_errors_name_the_problem(run, tmp_path, capsys, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpts)
    shutil.copytree(ckpts / "step-00000004", ckpts / "step-00000006.tmp")  # a save that never committed
    rc, out = bagualu("export", tmp_path / "run", tmp_path / "out", "--step", "6", ok=False, capsys=capsys)
    assert rc == 2 and "step-00000006.tmp is torn" in out.err and "committed steps: 2, 4" in out.err
    _, out = bagualu("export", tmp_path / "run", tmp_path / "out", capsys=capsys)  # newest complete: skips the torn
    assert "exported step 4" in out.out and "skipping checkpoint" in caplog.text and "step-00000006.tmp" in caplog.text
    rc, out = bagualu("export", tmp_path / "run", tmp_path / "out", "--step", "3", ok=False, capsys=capsys)
    assert rc == 2 and "step 3 has no checkpoint" in out.err and "committed steps: 2, 4" in out.err
    (tmp_path / "empty").mkdir()
    rc, out = bagualu("export", tmp_path / "empty", tmp_path / "out", ok=False, capsys=capsys)
    assert rc == 2 and "no checkpoint in" in out.err and "empty" in out.err
