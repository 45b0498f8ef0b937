"""Token-shard datasets: token ids in flat binary shards plus a manifest, read memory-mapped.

    DIR/manifest.json         {"format": "bagualu-tokens/1", "dtype": "uint16", "total_tokens": N,
                               "shards": [{"file": "shard-00000.bin", "tokens": n, "sha256": ...}, ...],
                               "eos_token_id": ..., "vocab_size": ..., "documents": D}
    DIR/shard-00000.bin       little-endian token ids; documents separated by eos_token_id

Shards are written atomically and the manifest last, so a directory with a manifest is complete; the
manifest's checksums let ``TokenDataset(verify=True)`` detect a torn or corrupted shard. Local shards
are memory-mapped (no copy); remote ones are read once into memory.
Rejected alternative: one token file per document (millions of small files defeat object stores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from bagualu.storage.fs import atomic_write, filesystem, join, sha256_file

FORMAT = "bagualu-tokens/1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Append documents (token id lists); a shard is flushed every ``shard_tokens`` tokens."""

    def __init__(self, out: str, *, vocab_size: int, eos_token_id: int, shard_tokens: int = 64 << 20,
                 extra: dict | None = None):
        self.fs, self.root = filesystem(out)
        self.fs.makedirs(self.root, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.eos, self.shard_tokens = vocab_size, eos_token_id, shard_tokens
        self.extra = extra or {}
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        a = np.asarray(list(ids) + [self.eos], dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {a.min()}, max {a.max()}")
        self.buf.append(a.astype(self.dtype))
        self.buffered += a.size
        self.documents += 1
        if self.buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buf)
        name = f"shard-{len(self.shards):05d}.bin"
        path = join(self.root, name)
        with atomic_write(self.fs, path) as f:
            f.write(data.tobytes())
        self.shards.append({"file": name, "tokens": int(data.size), "sha256": sha256_file(self.fs, path)})
        self.buf, self.buffered = [], 0

    def close(self) -> dict:
        """Flush and write the manifest (last: its presence means the dataset is complete)."""
        self._flush()
        manifest = {"format": FORMAT, "dtype": self.dtype.str.lstrip("<|"), "total_tokens":
                    sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards,
                    "eos_token_id": self.eos, "vocab_size": self.vocab_size, **self.extra}
        with atomic_write(self.fs, join(self.root, MANIFEST), "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        return manifest


@dataclass
class TokenDataset:
    """All shards of a prepared directory as one flat token sequence (memory-mapped)."""

    root: str
    verify: bool = False

    def __post_init__(self):
        self.fs, path = filesystem(self.root)
        mpath = join(path, MANIFEST)
        if not self.fs.exists(mpath):
            raise FileNotFoundError(f"{self.root}: no {MANIFEST} — not a prepared token dataset, or its preparation "
                                    f"did not finish (run `bagualu data prepare FILES... --out {self.root}`)")
        self.manifest = json.loads(self.fs.cat_file(mpath))
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        local_fs = isinstance(self.fs, LocalFileSystem)
        self.arrays = []
        for s in self.manifest["shards"]:
            spath = join(path, s["file"])
            if not self.fs.exists(spath):
                raise FileNotFoundError(f"{self.root}: shard {s['file']} listed in {MANIFEST} is missing")
            if self.verify and sha256_file(self.fs, spath) != s["sha256"]:
                raise ValueError(f"{self.root}: shard {s['file']} does not match its checksum (torn or corrupted)")
            if local_fs:
                arr = np.memmap(spath, dtype=dtype, mode="r")
            else:  # object store: read once into memory
                arr = np.frombuffer(self.fs.cat_file(spath), dtype=dtype)
            if arr.size != s["tokens"]:
                raise ValueError(f"{self.root}: shard {s['file']} holds {arr.size} tokens, manifest says {s['tokens']}")
            self.arrays.append(arr)
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated shards (int64)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the dataset of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pos, filled = start - int(self.offsets[i]), 0
        while filled < length:
            take = min(length - filled, self.arrays[i].size - pos)
            out[filled:filled + take] = self.arrays[i][pos:pos + take]
            filled, i, pos = filled + take, i + 1, 0
        return out
