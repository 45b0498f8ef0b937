"""glibc malloc tuning for large, short-lived host tensors.

glibc serves allocations above its mmap threshold (adaptive, up to 32 MiB) with fresh ``mmap`` pages and
returns them with ``munmap`` on free, so every large activation is page-faulted again on each step —
measured here at 2–3 GB/s instead of ~30 GB/s for reused memory. Raising the mmap threshold and the trim
threshold keeps freed blocks in the heap for reuse: the same effect a caching allocator gives on a GPU.

Process-wide, so it is called explicitly by entry points (training, benchmarks), never at import; a
benchmark that tunes it tunes it for the peer it compares against too.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_state = {"tuned": False}


def tune_glibc_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 34,
                      top_pad: int = 256 << 20) -> bool:
    """Keep freed large blocks for reuse. Returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(k, min(v, 2**31 - 1)) == 1 for k, v in (
        (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad)))
    _state["tuned"] = ok
    return ok


def describe() -> str:
    return "glibc malloc, mmap/trim thresholds raised (bagualu.memory)" if _state["tuned"] else "glibc malloc defaults"
