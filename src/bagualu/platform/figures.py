"""Peak memory bandwidth and GEMM FLOP/s of a platform: measured once, cached on disk, or from a table.

The cost models (planner, compiler autotuner) need two numbers per chip. Datasheet figures are often
30-50% above what a copy kernel or a GEMM actually reaches, and a CPU's depend on the core count the
container was given, so we *measure* them with a micro-benchmark (well under a second per figure) and
cache the result as JSON under ``BAGUALU_CACHE_DIR/platform/<name>-<fingerprint>.json``. The
fingerprint hashes what changes the answer (platform, CPU model, core count, torch version, thread
count, plus the platform's device names), so a cache copied to another machine is simply not found.

Every figure carries its source: ``"measured"`` (this process ran the benchmark), ``"cached"`` (read
from the JSON file) or ``"table: <why>"`` (``BAGUALU_NO_MEASURE`` is set, the dtype is unsupported,
or the benchmark failed). Within a process each figure is memoised; ``clear_memo()`` forgets them.

The compiler first asks for the figures while tracing on fake tensors, where a copy takes no time; the
benchmarks run outside the tracer's modes (``utils.tracing.real_tensors``), or the absurd figure would
be cached for every later process.

Concurrent writers (several ranks on one host measuring at once) each replace the file atomically;
the last one wins, so at worst a figure is measured again later. Ranks sharing a host also share its
memory bus, so measure before launching workers when the figure matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bagualu.utils import env
from bagualu.utils.tracing import real_tensors
from bagualu.utils.logging import get_logger

if TYPE_CHECKING:
    from bagualu.platform.interface import Platform

log = get_logger(__name__)

_memo: dict[tuple[str, str], "Figure"] = {}  # (cache file, figure key) -> figure


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One peak figure (bytes/s or FLOP/s) and where it came from."""

    value: float
    source: str  # "measured" | "cached" | "table: <reason>"


def clear_memo() -> None:
    """Forget the figures memoised in this process (the disk cache stays)."""
    _memo.clear()


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), or the stdlib's guess elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as _stdlib_platform  # the stdlib module, not this package

    return _stdlib_platform.processor() or _stdlib_platform.machine() or "unknown cpu"


def fingerprint(plat: type[Platform]) -> dict:
    """What the figures depend on; a change in any of these invalidates the cache."""
    return {
        "platform": plat.name,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **plat._fingerprint_extra(),
    }


def cache_file(plat: type[Platform]) -> Path:
    fp = fingerprint(plat)
    digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return Path(env.get("BAGUALU_CACHE_DIR")) / "platform" / f"{plat.name}-{digest}.json"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, plat: type[Platform], key: str, value: float) -> None:
    """Merge one figure into the cache file; atomic replace, failures only logged (cache is optional)."""
    try:
        data = _read(path)
        data["fingerprint"] = fingerprint(plat)
        data.setdefault("figures", {})[key] = {"value": value, "measured_at": time.time()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache platform figure %s in %s: %s", key, path, e)


def _figure(plat: type[Platform], key: str, measure, table: float, unsupported: str | None) -> Figure:
    path = cache_file(plat)
    if (path_key := (str(path), key)) in _memo:
        return _memo[path_key]
    if unsupported is not None:
        fig = Figure(value=table, source=f"table: {unsupported}")
    elif env.get("BAGUALU_NO_MEASURE"):
        fig = Figure(value=table, source="table: BAGUALU_NO_MEASURE is set")
    elif (hit := _read(path).get("figures", {}).get(key)) is not None:
        fig = Figure(value=float(hit["value"]), source="cached")
    else:
        try:
            t0 = time.perf_counter()
            with real_tensors():
                value = float(measure())
            log.debug("measured %s %s = %.3g in %.2fs", plat.name, key, value, time.perf_counter() - t0)
            if not value > 0:
                raise RuntimeError(f"benchmark returned {value}")
        except Exception as e:  # noqa: BLE001 - any failure means "use the table", never a crash
            log.warning("measuring %s %s failed (%s: %s); using the table value", plat.name, key, type(e).__name__, e)
            fig = Figure(value=table, source=f"table: measurement failed ({type(e).__name__})")
        else:
            _write(path, plat, key, value)
            fig = Figure(value=value, source="measured")
    _memo[path_key] = fig
    return fig


def _best_seconds(plat: type[Platform], fn, *, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> float:
    """Fastest single run of ``fn`` (device-synchronised), repeating until the time budget is spent."""
    fn()
    plat.synchronize()  # warm-up: allocation, page faults, kernel selection
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or (spent < budget_s and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        plat.synchronize()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def measure_copy_bandwidth(plat: type[Platform]) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a reused buffer of ``plat._bench_copy_bytes``; counts read + write."""
    n = plat._bench_copy_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=plat.current_device())
    dst = torch.empty_like(src)
    seconds = _best_seconds(plat, lambda: dst.copy_(src), budget_s=0.25)
    return 2 * n * 4 / seconds


def measure_gemm_flops(plat: type[Platform], dtype: torch.dtype) -> float:
    """FLOP/s of an n x n x n matmul; n doubles from 256 until one GEMM takes >= 10 ms or reaches the cap.

    Growing n bounds the cost on slow paths (fp16 GEMM on a CPU without fp16 units is ~100x slower than
    fp32) while still reaching a size that saturates a fast chip.
    """
    dev = plat.current_device()
    n = 256
    while True:
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        seconds = _best_seconds(plat, lambda: a @ b, budget_s=0.0, min_reps=1)
        if seconds >= 0.01 or n >= plat._bench_gemm_max_n:
            break
        n *= 2
    seconds = _best_seconds(plat, lambda: a @ b, budget_s=0.25)
    return 2 * n**3 / seconds


def bandwidth(plat: type[Platform]) -> Figure:
    table_bw, _ = plat._table_figures()
    return _figure(plat, "copy_bandwidth", lambda: measure_copy_bandwidth(plat), table_bw, None)


def flops(plat: type[Platform], dtype: torch.dtype) -> Figure:
    _, table_flops = plat._table_figures()
    dname = str(dtype).removeprefix("torch.")
    table = table_flops.get(dname, table_flops.get("float32", 1e9))
    unsupported = None if plat.supports_dtype(dtype) else f"{dname} unsupported on {plat.name}"
    return _figure(plat, f"gemm_flops.{dname}", lambda: measure_gemm_flops(plat, dtype), table, unsupported)
