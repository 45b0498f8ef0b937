"""Shared benchmark plumbing: machine facts, interleaved timing, the table and --json output."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch


def machine_facts() -> dict:
    from bagualu.platform import current_platform
    from bagualu.utils.openmp import openmp_settings

    plat = current_platform()
    return {
        "load_avg_1m": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "platform": plat.name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...: which kernels ran
        "allocator": allocator(),
        "copy_GBps": plat.peak_memory_bandwidth() / 1e9,
        "gemm_fp32_GFLOPs": plat.peak_flops(torch.float32) / 1e9,
        "gemm_bf16_GFLOPs": plat.peak_flops(torch.bfloat16) / 1e9 if plat.supports_dtype(torch.bfloat16) else None,
        "openmp": openmp_settings(),  # how torch's idle OpenMP threads wait (bagualu.utils.openmp)
    }


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy measured now (read + write counted; the best of ``reps``): the
    memory-bandwidth yardstick of a run, at the thread count in force."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def allocator() -> str:
    from bagualu.memory import host_allocator

    return host_allocator.describe() + " (same for ours and the peer)"


def interleaved(fns: dict[str, callable], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, alternating them (ours, peer, ours, peer, ...)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
