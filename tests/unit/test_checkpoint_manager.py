"""CheckpointManager in one process: atomic commit with a manifest, retention, verification, errors."""

from __future__ import annotations

import pytest
import torch

from bagualu.checkpoint import CheckpointManager

pytestmark = pytest.mark.unit


def test_commit_keep_load_and_verify(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep=2, async_save=False)
    for step in (1, 2, 3):
        m.save(step, {"w": torch.full((4,), float(step)), "step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    latest = m.latest()
    assert latest.name == "step-00000003" and (latest / "manifest.json").is_file()
    sd = {"w": torch.zeros(4), "step": 0}
    m.load(sd, latest)
    assert torch.equal(sd["w"], torch.full((4,), 3.0)) and sd["step"] == 3
    f = next(p for p in latest.iterdir() if p.suffix == ".distcp")
    f.write_bytes(b"x" + f.read_bytes()[1:])
    assert m.latest().name == "step-00000002"
    assert "does not match its checksum" in caplog.text and "step-00000003" in caplog.text


def test_unwritable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("a file where the run directory should be")  # fails even for root
    with pytest.raises(RuntimeError, match="cannot create the checkpoint directory .*run/checkpoints"):
        CheckpointManager(tmp_path / "run")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, {"w": torch.ones(2)})
    import torch.distributed.checkpoint as dcp

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(RuntimeError, match=r"writing checkpoint step-00000002.tmp failed .*No space left on device"
                                           r".*step-00000001 is intact"):
        m.save(2, {"w": torch.ones(2)})
    assert m.latest().name == "step-00000001"
    assert not (tmp_path / "checkpoints" / "step-00000002.tmp").exists()
