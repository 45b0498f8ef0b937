"""``bagualu export`` as a user runs it: checkpoints written by 2 ranks with EP=2 (each rank its experts)
export in one process to a Hugging Face directory whose logits equal the trained model's — in
``bagualu.models`` and in ``transformers`` — for the newest or a chosen step; torn, unknown and missing
checkpoints are clear errors; a full disk during an asynchronous checkpoint write stops the run with an
error naming the directory and leaves the previous checkpoint intact."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystem

from hf_models import transformers

import bagualu.models as bm
from bagualu.checkpoint import CheckpointManager
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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # DCP's extra writer threads
def test_full_disk_during_an_async_checkpoint_is_a_clear_error_and_keeps_the_last_one(run, tmp_path, capsys,
                                                                                       monkeypatch):
    """The disk fills while the background thread writes step 4's shards: `bagualu train` stops with an
    error naming the directory, and step 2 still verifies and exports."""
    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "step-00000004" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        with real(self, path, mode) as f:
            yield f

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, out = bagualu("train", "--run-dir", tmp_path / "full", "--nproc", "1", f"--data.path={run.parent / 'data'}",
                          "--train.steps=4", "--train.warmup=1", "--train.global_batch=4", "--train.seq_len=32",
                          "--model.num_layers=1", "--train.eval_windows=4", "--train.checkpoint_every=2",
                          "--train.checkpoint_async=true", ok=False, capsys=capsys)
    finally:
        torch.set_num_threads(threads)
    ckpts = tmp_path / "full" / "checkpoints"
    assert rc == 2
    assert f"error: writing checkpoint step-00000004.tmp to {ckpts} failed" in out.err
    assert "No space left on device" in out.err and "step-00000002 is intact" in out.err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    assert CheckpointManager.check(str(ckpts / "step-00000002")) is None
    monkeypatch.undo()
    _, out = bagualu("export", tmp_path / "full", tmp_path / "out", capsys=capsys)
    assert "exported step 2" in out.out
