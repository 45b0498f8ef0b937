"""Reading and writing safetensors checkpoints in the Hugging Face layout.

Single file ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).
Tensors are read one at a time through ``safe_open`` (memory-mapped), so loading never holds a second
full copy of the model; shards are written one at a time for the same reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bagualu.models.errors import ModelLoadError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size like 5GB, 500MB or 1048576")
    return int(float(m[1]) * _UNITS[(m[2] or "").lower()])


def checkpoint_files(path: Path) -> list[str]:
    """The safetensors files of a model directory, in order; a clear error when there are none."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(path, INDEX, f"is not a valid safetensors index ({e})") from None
        for f in files:
            if not (path / f).is_file():
                raise ModelLoadError(path, f, f"is missing (listed in {INDEX})")
        return files
    if (path / SINGLE).is_file():
        return [SINGLE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(path, SINGLE, "is missing; only PyTorch pickle weights (*.bin) were found — "
                             "convert them to safetensors (pickles can run arbitrary code and are not loaded)")
    raise ModelLoadError(path, SINGLE, f"is missing (and there is no {INDEX}); no weights to load")


def iter_tensors(path: Path, files: Iterable[str], device: str = "cpu",
                 skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file, name, tensor) for every tensor of every file, except names ``skip`` accepts (never read)."""
    for f in files:
        try:
            handle = safe_open(str(path / f), framework="pt", device=device)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(path, f, f"is not a readable safetensors file ({e})") from None
        with handle as h:
            for name in h.keys():
                if skip is None or not skip(name):
                    yield f, name, h.get_tensor(name)


def write_sharded(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int) -> list[str]:
    """Write tensors into shards of at most ``max_shard_size`` bytes; return the files written.

    Each shard is written (to a temporary name) as soon as it is full, so at most one shard is held in
    host memory; the final names need the shard count, so renames happen at the end.
    """
    written: list[tuple[Path, list[str], int]] = []  # (tmp file, tensor names, bytes)
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        tmp = path / f".shard-{len(written):05d}.safetensors.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard), size))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_size:
            flush()
            shard, size = {}, 0
        # own storage per tensor: safetensors refuses views that share memory (stacked experts)
        shard[name] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
    flush()
    n = len(written)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for old in list(path.glob("model*.safetensors")) + [path / INDEX]:
        if old.name not in names and old.exists():
            old.unlink()  # stale shards of an earlier save would be read by a later load
    for fname, (tmp, _, _) in zip(names, written):
        os.replace(tmp, path / fname)
    if n > 1:
        weight_map = {k: f for f, (_, keys, _) in zip(names, written) for k in keys}
        index = {"metadata": {"total_size": sum(s for _, _, s in written)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
