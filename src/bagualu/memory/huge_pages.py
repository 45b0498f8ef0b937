"""Transparent huge pages (2 MiB) under large host tensors: model weights that every decode step streams.

A decode step at batch 1 reads every weight once, from DRAM (a ~110M-parameter model is 200 MB in bf16, far
above the last-level cache). On 4 KiB pages that is a TLB miss and a page walk every 4 KiB of every weight
stream, and the hardware prefetchers stop at each page boundary; on 2 MiB pages neither happens. Measured
on a Zen 5 box (2 cores, THP in ``madvise`` mode, so glibc's and torch's allocations get 4 KiB pages unless
asked): batch-1 bf16 decode of the ~110M Llama 147-155 -> 161-166 tokens/s, of the small Mixtral 324 ->
353-370 (``benchmarks/serve.py``'s batch-1 figure rose from 0.68-0.71 to 0.73-0.79 of the bandwidth bound).

``advise_huge_pages`` asks for huge pages over the whole 2 MiB pages inside the tensors' storages (storages
side by side, as an allocator places many small weights, count as one stretch):
``madvise(MADV_HUGEPAGE)`` (new pages there are huge) and ``madvise(MADV_COLLAPSE)`` (Linux >= 6.1: the
pages already there are copied into huge ones now, in the calling thread). Contents never change; memory
use can grow by up to 2 MiB per span end. Where THP is off (``never``), on other systems, or for memory the
kernel will not collapse, it does nothing and says so in its result. Process state is not touched beyond
those ranges, so it is safe to call on a library user's tensors (the serving engine does, for its model).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

HUGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass
class HugePageReport:
    mode: str  # the kernel's THP mode: always, madvise, never; "unsupported" off Linux
    spans: int = 0  # 2 MiB-aligned spans advised
    advised_bytes: int = 0
    collapsed_bytes: int = 0  # of those, collapsed into huge pages now (MADV_COLLAPSE succeeded)
    collapse_error: str | None = None  # why collapsing a span failed, the last time one did (EINVAL: a kernel
    # before 6.1, or memory it does not collapse)


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word of its sysfs setting), or ``unsupported``."""
    try:
        text = _SYSFS.read_text()
    except OSError:
        return "unsupported"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unsupported"


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


GAP = 64 << 10  # storages this close together count as one stretch (malloc headers, small neighbours)


def storage_ranges(tensors: Iterable[torch.Tensor | None]) -> list[tuple[int, int]]:
    """``[start, end)`` of each CPU tensor's storage, once per storage, sorted."""
    return sorted({(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in
                   (t.untyped_storage() for t in tensors if t is not None and t.device.type == "cpu"
                    and not t.is_sparse) if s.nbytes()})


def huge_spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole 2 MiB pages inside ``ranges`` (sorted): ranges within ``GAP`` of each other (the many weights
    under 2 MiB that an allocator placed side by side) merged into stretches first."""
    stretches: list[list[int]] = []
    for a, b in ranges:
        if stretches and a <= stretches[-1][1] + GAP:
            stretches[-1][1] = max(stretches[-1][1], b)
        else:
            stretches.append([a, b])
    out = []
    for a, b in stretches:
        lo, hi = (a + HUGE - 1) // HUGE * HUGE, b // HUGE * HUGE
        if hi > lo:
            out.append((lo, hi))
    return out


def advise_huge_pages(tensors: Iterable[torch.Tensor], collapse: bool = True) -> HugePageReport:
    """Back the CPU tensors' storages with huge pages where the kernel allows (module docstring)."""
    report = HugePageReport(mode=thp_mode())
    libc = _libc() if report.mode in ("always", "madvise") else None
    if libc is None:
        return report
    for a, b in huge_spans(storage_ranges(tensors)):
        if libc.madvise(a, b - a, MADV_HUGEPAGE) != 0:
            continue
        report.spans += 1
        report.advised_bytes += b - a
        if not collapse:
            continue
        if libc.madvise(a, b - a, MADV_COLLAPSE) == 0:
            report.collapsed_bytes += b - a
        else:
            e = ctypes.get_errno()
            report.collapse_error = errno.errorcode.get(e, str(e))
    return report

