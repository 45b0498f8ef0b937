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


def interleaved(fns: dict[str, callable], reps: int, warmup: int = 1, between: callable | None = None,
                rotate: bool = False) -> dict[str, float]:
    """Median seconds per call of each fn, alternating them (ours, peer, ours, peer, ...).

    ``between`` (untimed) runs before every timed call: ``cache_scrubber()`` gives each call the same
    cold, clean cache, so no side pays for the dirty lines the call before it left (see there).
    ``rotate``: repetition i starts with the i-th fn, so each follows every other equally often: what a
    call leaves behind can slow the next one (after eager's bf16 RMSNorm, whichever compiled RMSNorm came
    next ran 0.3-0.5 ms slower than after the other compiled one, through a scrub and a 10 ms sleep)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(reps):
        for k, f in (items[i % len(items):] + items[:i % len(items)]) if rotate else items:
            if between is not None:
                between()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cache_scrubber() -> callable:
    """A callable that reads a buffer twice the last-level cache's size, evicting whatever a previous call
    left there, so every timed call starts alike: its inputs in DRAM, the cache holding clean lines.
    Without it a call finds part of its inputs in the cache when the call before it used the same ones
    (a bf16 RMSNorm kernel over 2 x 16 MiB of inputs, 2 threads: 1.08 ms warm, 1.52 ms cold), which
    favours whichever side runs second."""
    from bagualu.compiler.codegen.cpu import last_level_cache_bytes

    buf = torch.ones(max(64 << 20, 2 * last_level_cache_bytes()) // 4)  # 64 MiB where sysfs says nothing

    def scrub() -> None:
        buf.sum()

    return scrub


def attention_options(ap, cases: str, cases_help: str, reps: int) -> None:
    """The options of the attention benchmarks (decode_attention.py, prefill_attention.py): cases, the
    model's attention shape, dtypes, repetitions, threads, --json."""
    ap.add_argument("--cases", default=cases, help=cases_help)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every contender (default: torch's)")
    ap.add_argument("--json", default=None)


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
