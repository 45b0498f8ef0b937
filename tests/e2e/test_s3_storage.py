"""Object storage (S3 API) as a user would use it, against a local ``moto`` server the suite starts:
``bagualu data prepare --out s3://...``, ``bagualu train`` reading its token shards from S3 and writing
its checkpoints there (the manifest, written last, is the commit marker), ``--resume`` from S3 skipping a
torn checkpoint and continuing the run exactly, and ``bagualu export s3://...``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import bagualu.models as bm  # noqa: E402
from bagualu.cli.main import main  # noqa: E402
from bagualu.storage import TokenDataset, filesystem  # noqa: E402

pytestmark = pytest.mark.e2e
BAGUALU = str(Path(sys.executable).parent / "bagualu")
BUCKET = "s3://bagualu-test"
TRAIN = ["--nproc", "1", "--train.steps=4", "--train.warmup=1", "--train.global_batch=4", "--train.seq_len=64",
         "--model.num_layers=2", "--train.eval_windows=4", "--train.checkpoint_every=2", "--train.dtype=float32",
         f"--data.path={BUCKET}/data", f"--train.checkpoint_dir={BUCKET}/run/checkpoints"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port; the AWS variables point s3fs (here and in subprocesses) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs, _ = filesystem(BUCKET)
    fs.mkdir(BUCKET.removeprefix("s3://"))
    yield fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def train(run_dir: Path, *extra: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as torchrun sets: 2 threads on a shared 2-core box crawl
    p = subprocess.run([BAGUALU, "train", "--run-dir", str(run_dir), *TRAIN, *extra], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if "step" in r}


def test_data_train_resume_and_export_on_s3(s3, tmp_path, capsys):
    assert main(["data", "prepare", "--out", f"{BUCKET}/data", "--max-mb", "0.3", "--vocab-size", "512"]) == 0
    assert TokenDataset(f"{BUCKET}/data", verify=True).vocab_size == 512

    out = train(tmp_path / "run")
    ckpts = f"{BUCKET}/run/checkpoints"
    steps = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(ckpts.removeprefix("s3://"), detail=False))
    assert steps == ["step-00000002", "step-00000004"], steps
    assert f"checkpoint committed: {ckpts}/step-00000004" in out
    assert s3.isfile(f"{ckpts}/step-00000004/manifest.json") and s3.isfile(f"{ckpts}/step-00000004/.metadata")

    # a write that died before its commit: every object there but the manifest
    s3.rm(f"{ckpts}/step-00000004/manifest.json")
    resumed = tmp_path / "resumed"
    out = train(resumed, "--resume")
    assert f"skipping torn checkpoint {ckpts}/step-00000004" in out and "(step 2)" in out
    ref, got = losses(tmp_path / "run"), losses(resumed)
    assert sorted(got) == [3, 4]
    for s in got:
        assert abs(got[s] - ref[s]) / ref[s] < 1e-6, (s, got[s], ref[s])
    assert s3.isfile(f"{ckpts}/step-00000004/manifest.json")  # re-saved and committed by the resumed run

    assert main(["export", str(resumed), str(tmp_path / "hf")]) == 0  # RUN_DIR's config names the S3 checkpoints
    assert "exported step 4 (mixtral" in capsys.readouterr().out
    ids = torch.tensor([bm.load_tokenizer(tmp_path / "hf").encode("import sys\n")])
    with torch.no_grad():
        exported = bm.from_pretrained(tmp_path / "hf", device="cpu")(ids)
        trained = bm.from_pretrained(resumed / "hf", device="cpu")(ids)
    assert torch.equal(exported, trained)


def test_run_dir_on_object_storage_is_a_clear_error(s3, capsys):
    assert main(["train", "--nproc", "1", "--run-dir", f"{BUCKET}/somewhere"]) == 2
    assert "must be local" in capsys.readouterr().err
