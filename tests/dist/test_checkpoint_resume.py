"""Checkpoints through ``bagualu train``: resume continues the exact run (same world size) and reshards
(2 ranks → 1); a torn or corrupt newest checkpoint is skipped by name; a SIGKILLed rank is recovered by
the elastic launcher from the last checkpoint, ending with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.dist
BAGUALU = str(Path(sys.executable).parent / "bagualu")
ARGS = ["--train.warmup=1", "--train.dtype=float32", "--train.global_batch=8", "--model.num_layers=2",
        "--train.checkpoint_every=2"]


def train(run_dir: Path, *extra: str, steps: int = 6) -> subprocess.CompletedProcess:
    p = subprocess.run([BAGUALU, "train", "--run-dir", str(run_dir), f"--train.steps={steps}", *ARGS, *extra],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if "step" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    train(root / "ref", "--nproc", "2", "--data.corpus_mb=0.5")
    return root / "ref"


@pytest.mark.parametrize("nproc", [2, 1])
def test_resume_continues_the_run_and_reshards(reference, tmp_path, nproc):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000004")
    p = train(run, "--nproc", str(nproc), "--resume", f"--data.path={reference / 'data'}")
    assert "resumed from" in p.stderr + p.stdout and "(step 4)" in p.stderr + p.stdout
    ref, got = losses(reference), losses(run)
    assert sorted(got) == [5, 6]
    for s in got:
        assert abs(got[s] - ref[s]) / ref[s] < 1e-6, (s, got[s], ref[s])


def test_torn_and_corrupt_checkpoints_are_skipped_by_name(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    newest = run / "checkpoints" / "step-00000006"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")  # corrupt
    shutil.copytree(newest, run / "checkpoints" / "step-00000008.tmp")  # torn
    p = train(run, "--nproc", "2", "--resume", f"--data.path={reference / 'data'}", steps=8)
    out = p.stderr + p.stdout
    assert "skipping torn checkpoint" in out and "step-00000008.tmp" in out
    assert "skipping checkpoint" in out and "step-00000006" in out and "does not match its checksum" in out
    assert "(step 4)" in out
    assert sorted(losses(run)) == [5, 6, 7, 8]


def _workers(run_dir: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "bagualu.train.entry" in cmd and str(run_dir) in cmd:
                pids.append(int(d.name))
    return pids


def test_sigkilled_rank_recovers_to_the_uninterrupted_weights(reference, tmp_path):
    run = tmp_path / "run"
    cmd = [BAGUALU, "train", "--run-dir", str(run), "--train.steps=6", *ARGS, "--nproc", "2", "--max-restarts", "1",
           "--train.checkpoint_async=false", f"--data.path={reference / 'data'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and killed is None and proc.poll() is None:
        if (run / "log.jsonl").exists() and max(losses(run), default=0) >= 3:
            workers = _workers(run)
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, "the run ended before a rank could be killed:\n" + out[-2000:]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    want, got = load_file(reference / "hf" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] - got[k]).abs().max() <= 1e-6 * max(1.0, want[k].abs().max()), k
