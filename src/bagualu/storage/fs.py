"""Filesystem access through fsspec: local directories by default, any fsspec URL (s3://, gs://, ...)
where its driver is installed. Writes are atomic: to a temporary name, then one rename, so a reader (or
a crash) never sees half a file (on object stores a single-object PUT is itself atomic).

S3-compatible stores: ``s3fs`` reads the usual AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for a non-AWS endpoint such as MinIO or moto), or
fsspec's own ``FSSPEC_S3_<KEY>`` variables (``FSSPEC_S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from typing import Iterator

import fsspec


def filesystem(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a local path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_url(path: str | os.PathLike) -> bool:
    """True for a URL with a protocol other than ``file://`` (``s3://bucket/x``), False for a local path."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local filesystems have an atomic directory rename; object stores do not."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator:
    """Open ``path`` for writing; it appears under its name only if the block finishes without error."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def sha256_file(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
