"""The bundled default corpus: text that ships with every Python installation — the standard library's
own source files (code, docstrings, comments), gathered at run time, never downloaded.

Deterministic: files in sorted order, a fixed size budget; tests, site-packages and non-UTF-8 files
are skipped.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_files(max_bytes: int = 32 << 20) -> list[Path]:
    """Standard-library ``.py`` files, sorted, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(p.relative_to(root).parts[:-1]):
            continue
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        out.append(p)
        total += size
    if not out:
        raise FileNotFoundError(f"no standard-library sources under {root}; pass text files explicitly")
    return out


def read_documents(files: list[str | Path]):
    """Yield each readable UTF-8 file's text (one document per file); unreadable ones are skipped."""
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text
