"""``explain(fn, *args)``: what PowerFusion did with a function — regions, ops, mappings, times, fallbacks.

It compiles ``fn`` with the powerfusion back-end, runs it once on ``args`` (and its backward with
``backward=True``), captures the inputs each fused kernel saw, then times every kernel on those inputs
(median of ``reps`` calls) next to the cost model's prediction, and bytes moved as GB/s. Every ATen
fallback is listed with its reason; vendor ops (GEMM, attention, ...) are counted separately because
leaving them to the vendor library is the design, not a failure. ``record()`` does the same for any
code (the ``bagualu compile --explain SCRIPT`` command runs a script inside it).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch

from bagualu.compiler import graph as G


@dataclass
class KernelLine:
    graph: str
    name: str
    ops: list[str]
    domain: str
    mapping: str
    predicted_s: float
    measured_s: float | None
    bytes: int

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.measured_s / 1e9 if self.measured_s else None


@dataclass
class Explanation:
    kernels: list[KernelLine] = field(default_factory=list)
    fallbacks: list[tuple[str, str, str, str, bool]] = field(default_factory=list)  # graph, node, op, reason, vendor
    graphs: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    codegens: list[str] = field(default_factory=list)  # the code generator of each graph ("-": none)

    @property
    def n_fused_ops(self) -> int:
        return sum(len(k.ops) for k in self.kernels)

    def fallback_ops(self, vendor: bool | None = None) -> list[str]:
        return [f[2] for f in self.fallbacks if vendor is None or f[4] == vendor]

    def __str__(self) -> str:
        out = [f"PowerFusion: {len(self.graphs)} graph(s) ({', '.join(self.graphs)}), {len(self.kernels)} fused "
               f"kernel(s) covering {self.n_fused_ops} ATen ops, compile {self.compile_s:.2f} s, code generator "
               f"{'/'.join(sorted(set(self.codegens) - {'-'})) or '-'}"]
        out += [f"note: {n}" for n in self.notes]
        for k in self.kernels:
            meas = f"{k.measured_s * 1e6:9.1f} us" if k.measured_s else "        - us"
            bw = f"{k.gbps:6.1f} GB/s" if k.gbps else "     - GB/s"
            out.append(f"  [{k.graph}] {k.name:<6} {k.domain:<24} mapping {k.mapping:<22} predicted "
                       f"{k.predicted_s * 1e6:9.1f} us  measured {meas}  {bw}")
            out.append(f"      ops: {', '.join(_short(o) for o in k.ops)}")
        vendor = [f for f in self.fallbacks if f[4]]
        other = [f for f in self.fallbacks if not f[4]]
        if vendor:
            counts: dict[str, int] = {}
            for f in vendor:
                counts[_short(f[2])] = counts.get(_short(f[2]), 0) + 1
            out.append("  left to the vendor library: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        if other:
            out.append("  fallbacks to ATen (op: reason):")
            for g, node, op, reason, _ in other:
                out.append(f"    [{g}] {node} ({_short(op)}): {reason}")
        else:
            out.append("  fallbacks to ATen: none")
        return "\n".join(out)


def _short(op: str) -> str:
    return op.removeprefix("aten.").removesuffix(".default")


@contextlib.contextmanager
def record(measure: bool = True, reps: int = 5):
    """Collect an ``Explanation`` of every powerfusion compilation inside the block."""
    start = G.SEQ[0]
    ex = Explanation()
    prev = G.CAPTURE[0]
    G.CAPTURE[0] = True
    try:
        yield ex
    finally:
        G.CAPTURE[0] = prev
        _fill(ex, [r for r in G.REPORTS if r.seq >= start], measure, reps)


def _fill(ex: Explanation, reports: list[G.GraphReport], measure: bool, reps: int) -> None:
    for gi, r in enumerate(reports):
        tag = f"{r.label}#{gi}"
        ex.graphs.append(tag)
        ex.codegens.append(r.codegen or "-")
        ex.compile_s += r.compile_s
        if r.note:
            ex.notes.append(f"{tag}: {r.note}")
        ex.notes.extend(f"{tag}: rewrite: {w}" for w in r.rewrites)
        for kr in r.kernels:
            k = kr.kernel
            nbytes = sum(b.numel * b.itemsize for b in k.inputs + k.outputs) if k else 0
            measured = _time(kr.call, reps) if measure else None
            dom = f"{kr.rows} rows x " + " x ".join("x".join(map(str, s)) for s in kr.spaces) if kr.spaces \
                else f"{kr.rows} rows"
            ex.kernels.append(KernelLine(tag, kr.name, list(kr.ops), dom, kr.mapping, kr.predicted_s, measured,
                                         nbytes))
        for f in r.fallbacks:
            ex.fallbacks.append((tag, f.node, f.op, f.reason, f.vendor))


def _time(call, reps: int) -> float | None:
    if call is None or call.runner is None or not call.capture:
        return None
    args = call.capture[0][:call.n_kernel_inputs]
    if not call.runner.matches(args):
        return None
    call.runner(*args)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call.runner(*args)
        ts.append(time.perf_counter() - t0)
    call.capture.clear()
    return statistics.median(ts)


_COUNTER = itertools.count()


def _fresh(fn):
    """A wrapper with its own code object: Dynamo caches per code object, and explain must compile anew."""
    def call(*a, **k):
        return fn(*a, **k)

    call.__code__ = call.__code__.replace(co_name=f"powerfusion_explain_{next(_COUNTER)}")
    return call


def explain(fn, *args, backward: bool = False, measure: bool = True, reps: int = 5, options: dict | None = None,
            **kwargs) -> Explanation:
    """Compile ``fn`` with powerfusion, run it on ``args`` (and backward), and report what was fused.

    ``backward=True`` also runs the backward of the sum of the floating-point outputs, so the backward
    graph is compiled and reported. ``options`` are the back-end's (``torch.compile(..., options=)``).
    Returns an ``Explanation``; ``print()`` it for the table.
    """
    compiled = torch.compile(_fresh(fn), backend="powerfusion", options=options)
    with record(measure=measure, reps=reps) as ex:
        out = compiled(*args, **kwargs)
        if backward:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
            if not isinstance(loss, torch.Tensor):
                raise ValueError("explain(backward=True): no output of fn requires grad; pass inputs with "
                                 "requires_grad=True or use backward=False")
            loss.backward()
    return ex
