"""CheckpointManager in one process: atomic commit with a manifest, retention, verification, errors —
including a full disk during a synchronous and during an asynchronous (background) write."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystem

from bagualu.checkpoint import CheckpointManager

pytestmark = pytest.mark.unit


def test_commit_keep_load_and_verify(tmp_path, caplog):
    m = CheckpointManager(tmp_path / "checkpoints", keep=2, async_save=False)
    for step in (1, 2, 3):
        m.save(step, {"w": torch.full((4,), float(step)), "step": step}, files={"extra.json": b"{}"})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    latest = m.latest()
    assert os.path.basename(latest) == "step-00000003" and os.path.isfile(os.path.join(latest, "manifest.json"))
    assert open(os.path.join(latest, "extra.json")).read() == "{}"
    sd = {"w": torch.zeros(4), "step": 0}
    m.load(sd, latest)
    assert torch.equal(sd["w"], torch.full((4,), 3.0)) and sd["step"] == 3
    f = next(p for p in (tmp_path / "checkpoints" / "step-00000003").iterdir() if p.suffix == ".distcp")
    f.write_bytes(b"x" + f.read_bytes()[1:])
    assert os.path.basename(m.latest()) == "step-00000002"
    assert "does not match its checksum" in caplog.text and "step-00000003" in caplog.text


def test_async_save_snapshots_before_the_guarded_optimizer_step(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True)
    w = torch.nn.Parameter(torch.arange(6.0))
    opt = torch.optim.SGD([w], lr=1.0)
    m.guard(opt)
    for step in (1, 2):
        m.save(step, {"w": w.detach()})  # staged in a thread while the "forward" runs
        w.grad = torch.full((6,), 100.0)
        opt.step()  # waits for the staging copy, then writes the weights
    m.finish()
    sd = {"w": torch.zeros(6)}
    m.load(sd, m.latest())
    assert torch.equal(sd["w"], torch.arange(6.0) - 100)  # step 2's snapshot: after one update, not two
    m.close()


def test_unwritable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("a file where the run directory should be")  # fails even for root
    with pytest.raises(RuntimeError, match="cannot create the checkpoint directory .*run/checkpoints"):
        CheckpointManager(tmp_path / "run" / "checkpoints")


class _FullDisk:
    """A buffered file on a disk that fills up after ``room`` bytes: as with write(2) behind a buffer, the
    writes succeed and the flush at close fails with ENOSPC."""

    def __init__(self, f, room: int = 64):
        self.f, self.room, self.written = f, room, 0

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, b):
        self.written += len(b)
        return self.f.write(b)

    def close(self):
        self.f.close()
        if self.written > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_writes(monkeypatch):
    """Every file DCP's writer opens fills the disk after 64 bytes."""
    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as f:
            if "w" not in mode:
                yield f
                return
            disk = _FullDisk(f)
            yield disk
            disk.close()

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # DCP's extra writer threads
@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_names_the_directory_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, async_save):
    m = CheckpointManager(tmp_path / "ckpt", async_save=async_save)
    m.save(1, {"w": torch.ones(2)})
    m.finish()
    _full_disk_writes(monkeypatch)
    pattern = (r"writing checkpoint step-00000002.tmp to .*ckpt failed .*No space left on device.*"
               r"step-00000001 is intact — free space on .*ckpt")
    with pytest.raises(RuntimeError, match=pattern):
        m.save(2, {"w": torch.full((2,), 2.0)})
        m.finish()  # async: the background write's failure surfaces at the commit
    monkeypatch.undo()
    latest = m.latest()
    assert os.path.basename(latest) == "step-00000001" and m.check(latest) is None
    assert not (tmp_path / "ckpt" / "step-00000002.tmp").exists()
    sd = {"w": torch.zeros(2)}
    m.load(sd, latest)
    assert torch.equal(sd["w"], torch.ones(2))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_save_with_items_missing_from_its_metadata_is_refused(tmp_path):
    """DCP's extra writer threads die silently (their items just go missing from the metadata it returns,
    and dcp.save reports success); the manager checks the metadata before committing."""
    import torch.distributed.checkpoint as dcp

    from bagualu.checkpoint.manager import _check_written

    md = dcp.save({"a": torch.ones(3), "b": {"c": torch.zeros(2)}, "n": 5}, checkpoint_id=str(tmp_path), no_dist=True)
    _check_written(md)
    del md.storage_data[next(k for k in md.storage_data if k.fqn == "b.c")]
    with pytest.raises(OSError, match=r"1 item\(s\) were not written \(first: b.c\)"):
        _check_written(md)


def test_manifests_record_xxh3_and_older_sha256_manifests_still_verify(tmp_path, caplog):
    import hashlib
    import json

    from bagualu.checkpoint.manager import check_checkpoint

    m = CheckpointManager(tmp_path / "c", async_save=False)
    m.save(1, {"w": torch.arange(8.0)})
    d = tmp_path / "c" / "step-00000001"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["files"] and all(v.startswith("xxh3_128:") for v in manifest["files"].values())
    assert check_checkpoint(str(d)) is None
    # a manifest written before xxh3: bare sha256 hex digests
    manifest["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert check_checkpoint(str(d)) is None
    f = next(p for p in d.iterdir() if p.suffix == ".distcp")
    f.write_bytes(b"x" + f.read_bytes()[1:])
    assert "does not match its checksum" in check_checkpoint(str(d))
