"""Checkpoint directories: atomic commits, asynchronous writes, verified discovery, retention.

    RUN_DIR/checkpoints/step-00000300/   .metadata, __<rank>_0.distcp ..., manifest.json (written last)
    RUN_DIR/checkpoints/step-00000400.tmp/   being written (or torn by a crash: ignored, cleaned up)

A save writes into ``step-N.tmp``; with ``async_save`` DCP stages the tensors to host memory and writes
in a background thread, so the training step continues. The commit happens at the next save (or at
``finish``): every rank's write must be complete (a barrier), then rank 0 writes ``manifest.json`` with a
sha256 per file and renames the directory. A directory without a valid manifest — or whose files do not
match it — is never resumed from: ``latest`` skips it with a warning naming it. Only the newest ``keep``
committed checkpoints stay. A failed write (full disk, unwritable directory) raises a clear error and
leaves the committed checkpoints untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from bagualu.comm.mesh import side_group
from bagualu.utils.logging import get_logger

log = get_logger(__name__)
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class CheckpointManager:
    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.async_save = keep, async_save
        self._pending: tuple[int, Path, object] | None = None
        self.group = side_group()  # DCP's planning collectives run here, off the training step's group
        if _rank() == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RuntimeError(f"cannot create the checkpoint directory {self.dir}: {e}") from None
        _barrier()

    def _name(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def save(self, step: int, state_dict: dict) -> None:
        """Start writing ``state_dict`` as step ``step`` (collective); commits the previous save first."""
        self.finish()
        tmp = self.dir / f"step-{step:08d}.tmp"
        t0 = time.perf_counter()
        try:
            if self.async_save and dist.is_initialized():
                self._pending = (step, tmp, dcp.async_save(state_dict, checkpoint_id=str(tmp),
                                                           process_group=self.group))
            else:
                dcp.save(state_dict, checkpoint_id=str(tmp), process_group=self.group)
                self._pending = (step, tmp, None)
                self.finish()
        except Exception as e:
            self._abort(tmp, e)
        log.debug("checkpoint %d: %s in %.2fs", step, "staged" if self.async_save else "written",
                  time.perf_counter() - t0)

    def finish(self) -> None:
        """Wait for the pending write on every rank and commit it (collective)."""
        if self._pending is None:
            return
        step, tmp, fut = self._pending
        self._pending = None
        try:
            if fut is not None:
                fut.result()
        except Exception as e:
            self._abort(tmp, e)
        _barrier()
        if _rank() == 0:
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"step": step, "files": files, "world_size": dist.get_world_size() if dist.is_initialized()
                        else 1, "time": time.time()}
            with open(tmp / (MANIFEST + ".part"), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)
            final = self._name(step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("checkpoint committed: %s", final)

    def _abort(self, tmp: Path, e: Exception):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = self.latest(verify=False)
        raise RuntimeError(f"writing checkpoint {tmp.name} failed ({type(e).__name__}: {e}); the last committed "
                           f"checkpoint {last.name if last else '(none)'} is intact — free disk space or fix the "
                           f"permissions of {self.dir}") from e

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for torn in self.dir.glob("step-*.tmp"):
            shutil.rmtree(torn, ignore_errors=True)

    def latest(self, verify: bool = True) -> Path | None:
        """The newest committed checkpoint whose files match its manifest (others are skipped, with a warning)."""
        if not self.dir.exists():
            return None
        for d in sorted((p for p in self.dir.glob("step-*") if p.is_dir()), reverse=True):
            if d.name.endswith(".tmp"):
                log.warning("skipping torn checkpoint %s (its write never committed)", d)
                continue
            problem = self.check(d) if verify else None
            if problem is None:
                return d
            log.warning("skipping checkpoint %s: %s", d, problem)
        return None

    @staticmethod
    def check(d: Path) -> str | None:
        m = d / MANIFEST
        if not m.is_file():
            return "no manifest.json (torn write)"
        try:
            files = json.loads(m.read_text())["files"]
        except (ValueError, KeyError) as e:
            return f"unreadable manifest ({e})"
        for name, digest in files.items():
            f = d / name
            if not f.is_file():
                return f"{name} is missing"
            if _sha256(f) != digest:
                return f"{name} does not match its checksum (corrupt)"
        return None

    def load(self, state_dict: dict, path: Path) -> None:
        """Fill ``state_dict`` in place from checkpoint ``path`` (collective; reshards as needed)."""
        dcp.load(state_dict, checkpoint_id=str(path), process_group=self.group)
