"""Choose a kernel's mapping: enumerate the code generator's candidates, rank by the cost model, optionally
measure the best few, and cache the decision on disk per kernel, shape, thread count and platform.

The candidate space (which loop is split across threads, SIMD width, which recomputed values are
materialised per row) comes from the code generator, because it is chip-specific; the ranking is the
shared analytic model (``cost.py``). With ``BAGUALU_COMPILER_AUTOTUNE=1`` the ``AUTOTUNE_TOP`` best-ranked
candidates are compiled together and timed on synthetic inputs (medians of interleaved runs), and the
fastest wins. Measured decisions are JSON files under ``$BAGUALU_CACHE_DIR/powerfusion/decisions/``,
reused by later processes without measuring again (model decisions are recomputed: they are cheap, and
the platform figures they rest on may be re-measured).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bagualu.compiler import cost
from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.ir import Kernel, Mapping
from bagualu.compiler.lower import IR_TO_TORCH
from bagualu.utils import env
from bagualu.utils.logging import get_logger
from bagualu.utils.tracing import real_tensors

log = get_logger(__name__)
AUTOTUNE_TOP = 4


@dataclass
class Choice:
    mapping: Mapping
    predicted_s: float
    n_candidates: int
    measured_s: float | None = None
    source: str = "model"  # model | measured | cache


def _key(k: Kernel, gen_name: str) -> str:
    from bagualu.platform import current_platform

    plat = current_platform()
    h = hashlib.sha256()
    body = k.pretty().split("\n", 1)[1]  # without the kernel's name
    for part in (body, gen_name, plat.name, plat.device_name(0), str(torch.get_num_threads())):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _decision_dir() -> Path:
    return Path(env.get("BAGUALU_CACHE_DIR")) / "powerfusion" / "decisions"


def _load(key: str) -> dict | None:
    try:
        return json.loads((_decision_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def _save(key: str, payload: dict) -> None:
    d = _decision_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, d / f"{key}.json")
    except OSError as e:
        log.debug("powerfusion: cannot cache decision %s: %s", key, e)


def _to_json(m: Mapping) -> dict:
    return {"parallel": m.parallel, "vector": m.vector, "materialize": sorted(m.materialize),
            "row_block": m.row_block, "prefetch": m.prefetch, "stream": m.stream}


def _from_json(d: dict) -> Mapping:
    return Mapping(parallel=d["parallel"], vector=int(d["vector"]), materialize=frozenset(d["materialize"]),
                   row_block=int(d.get("row_block", 0)), prefetch=bool(d.get("prefetch", False)),
                   stream=bool(d.get("stream", False)))


def predict_best(k: Kernel, gen) -> float:
    """The cost model's time for ``k`` under its best candidate mapping (what a merge decision compares)."""
    mc = cost.machine(gen)
    return min(cost.predict(k, m, mc) for m in gen.candidates(k))


def choose(k: Kernel, gen) -> Choice:
    cands = gen.candidates(k)
    mc = cost.machine(gen)
    ranked = sorted(((cost.predict(k, m, mc), i, m) for i, m in enumerate(cands)), key=lambda t: (t[0], t[1]))
    key = _key(k, gen.name)
    autotune = env.get("BAGUALU_COMPILER_AUTOTUNE")
    cached = _load(key)
    m = _from_json(cached["mapping"]) if cached is not None and cached.get("source") == "measured" else None
    if m is not None and any(c.key() == m.key() for c in cands):  # (a mapping the generator no longer offers: re-decide)
        pred = next((p for p, _, c in ranked if c.key() == m.key()), ranked[0][0])
        return Choice(m, pred, len(cands), cached.get("measured_s"), "cache")
    best_pred, _, best = ranked[0]
    choice = Choice(best, best_pred, len(cands))
    if autotune and len(ranked) > 1:
        try:
            times = measure(k, gen, [m for _, _, m in ranked[:AUTOTUNE_TOP]])
            i = min(range(len(times)), key=times.__getitem__)
            m = ranked[i][2]
            choice = Choice(m, ranked[i][0], len(cands), times[i], "measured")
        except Exception as e:  # noqa: BLE001 - measuring is an optimisation; the model's pick stands
            log.info("powerfusion: autotuning %s failed (%s); using the cost model's choice", k.name, e)
    if choice.source != "measured":
        return choice  # the model is cheap and its inputs (platform figures) may change: never cached
    _save(key, {"mapping": _to_json(choice.mapping), "source": choice.source, "measured_s": choice.measured_s,
                "predicted_s": choice.predicted_s})
    return choice


def synthetic_inputs(k: Kernel) -> list[torch.Tensor]:
    """Inputs laid out as the kernel expects; integers are zero so every gather index is valid."""
    out = []
    g = torch.Generator().manual_seed(0)
    for b in k.inputs:
        dt = IR_TO_TORCH[b.dtype]
        n = sch.span(b)
        if dt.is_floating_point:
            base = torch.randn(n, generator=g).to(dt)
        else:
            base = torch.zeros(n, dtype=dt)
        out.append(torch.as_strided(base, b.shape, b.strides))
    return out


def measure(k: Kernel, gen, mappings: list[Mapping], reps: int = 5) -> list[float]:
    """Median seconds per call of ``k`` under each mapping (built together, interleaved runs). Called while
    AOTAutograd traces under fake tensors, so the inputs and the runs are made outside the tracer's modes."""
    variants = [replace_name(k, f"{k.name}_m{i}") for i in range(len(mappings))]
    runners = gen.build(list(zip(variants, mappings)))
    with real_tensors():
        return _timed(runners, synthetic_inputs(k), reps)


def _timed(runners, args, reps: int) -> list[float]:
    for r in runners:
        r(*args)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(reps):
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            r(*args)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def replace_name(k: Kernel, name: str) -> Kernel:
    return replace(k, name=name)
