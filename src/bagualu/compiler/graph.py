"""Compile one ATen FX graph: partition, search, generate code, and rebuild the graph around the kernels.

The result is a ``GraphModule`` in which each fusion region is one call to its compiled kernel and
everything else is the original ATen node. A region call checks the input layouts its kernel was built
for and, if a caller ever passes something else, runs the region's original ATen nodes instead (logged):
correctness never depends on a guess about strides. If no code generator exists for the platform, or
the compiler fails, every region stays ATen with the reason recorded.

Graphs with symbolic shapes (Dynamo's automatic dynamic shapes) are specialised per concrete input
shapes on first call and cached: each distinct shape compiles once, like a recompilation.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from bagualu.compiler.ir import Kernel
from bagualu.compiler.lower import Region
from bagualu.compiler.partition import Fallback, Partition, partition
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class KernelReport:
    name: str
    ops: list[str]
    rows: int
    spaces: list[tuple[int, ...]]
    mapping: str
    predicted_s: float
    candidates: int
    inputs: list[str]
    outputs: list[str]
    kernel: Kernel | None = None
    call: Any = None  # the RegionCall (for measuring)


@dataclass
class GraphReport:
    label: str
    n_nodes: int
    kernels: list[KernelReport] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    compile_s: float = 0.0
    codegen: str | None = None
    note: str = ""
    seq: int = -1
    rewrites: list[str] = field(default_factory=list)  # algebraic rewrites applied (rewrites.py)


REPORTS: list[GraphReport] = []  # most recent compilations, for explain(); bounded
MAX_REPORTS = 256
SEQ = [0]  # compilations so far (REPORTS[-1].seq == SEQ[0] - 1)
CAPTURE = [False]  # explain.record() sets it: region calls keep their first inputs for timing


class RegionCall:
    """Runs a region's kernel, or its ATen nodes when the inputs are not laid out as compiled for."""

    def __init__(self, region: Region, runner: Callable | None, name: str):
        self.region = region
        self.runner = runner
        self.__name__ = name
        self.__module__ = __name__
        self._fallback: fx.GraphModule | None = None
        self.warned = False
        self.capture: list | None = [] if CAPTURE[0] else None
        self.n_kernel_inputs = len(runner.kernel.inputs) if runner is not None else 0

    def fallback_module(self) -> fx.GraphModule:
        if self._fallback is None:
            g = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            for n in self.region.inputs:
                env[n] = g.placeholder(n.name)
            for n in self.region.nodes:
                env[n] = g.node_copy(n, lambda x: env[x])
            g.output(tuple(env[o] for o in self.region.outputs))
            self._fallback = fx.GraphModule(torch.nn.Module(), g)
        return self._fallback

    def __call__(self, *inputs):
        if self.capture is not None and not self.capture:
            self.capture.append(tuple(inputs))
        r = self.runner
        if r is not None:
            kin = inputs[:self.n_kernel_inputs]
            if r.matches(kin):
                return r(*kin)
        if r is not None and not self.warned:
            self.warned = True
            log.info("powerfusion: %s called with inputs laid out differently than compiled for; running its "
                     "ATen ops", self.__name__)
        return self.fallback_module()(*inputs)


CODEGENS = {"cpp": "bagualu.compiler.codegen.cpu:CppCodegen", "triton": "bagualu.compiler.codegen.gpu:TritonCodegen"}


def current_codegen(name: str | None = None):
    """The code generator ``name`` (a key of ``CODEGENS``), by default the platform's
    (``kernel_backends['compiler_codegen']``); returns (generator or None, why not)."""
    from bagualu.platform import current_platform
    from bagualu.utils.lazy import import_dotted

    plat = current_platform()
    path = CODEGENS[name] if name is not None else plat.kernel_backends.get("compiler_codegen")
    if path is None:
        return None, f"platform {plat.name!r} names no compiler code generator (kernel_backends['compiler_codegen'])"
    try:
        return import_dotted(path)(), None
    except Exception as e:  # noqa: BLE001 - a broken vendor tool chain must leave the model runnable
        return None, f"code generator {path!r} failed to load: {e}"


def _has_symbols(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt):
            return True
        if isinstance(v, torch.Tensor) and any(not isinstance(s, int) for s in v.shape):
            return True
    return False


@torch._disable_dynamo
def compile_graph(gm: fx.GraphModule, example_inputs, label: str = "graph", codegen: str | None = None,
                  dynamic_batch: bool = False) -> Callable:
    """A callable equivalent to ``gm`` with fusion regions replaced by compiled kernels.

    Never traced by Dynamo: AOTAutograd compiles a backward lazily, inside whatever frame first runs it.
    """
    if _has_symbols(gm):
        return ShapeSpecialized(gm, label, codegen, dynamic_batch)
    return _compile_static(gm, label, codegen)


def _compile_static(gm: fx.GraphModule, label: str, codegen: str | None = None, build=None,
                    record: bool = True, stream: bool = True) -> fx.GraphModule:
    """``build(gen, pairs)`` replaces ``gen.build`` (the dynamic-batch planner); ``record=False`` keeps
    the compilation out of ``REPORTS`` (what explain shows); ``stream=False`` forbids streamed stores
    (``Mapping.stream``)."""
    from bagualu.compiler import search

    t0 = time.perf_counter()
    report = GraphReport(label, sum(1 for n in gm.graph.nodes if n.op == "call_function"))
    gen, why = current_codegen(codegen)
    from bagualu.compiler.rewrites import renormalized_topk_softmax

    n_router = renormalized_topk_softmax(gm)
    if n_router:
        report.rewrites.append(f"renormalised top-k of a softmax -> softmax of the top-k logits (x{n_router})")
    part = partition(gm, (lambda k: search.predict_best(k, gen)) if gen is not None else None)
    report.fallbacks = part.fallbacks
    runners: list[Callable | None] = [None] * len(part.kernels)
    reported: list[int] = []  # region index of each report.kernels entry
    if gen is None:
        report.note = why or ""
        log.info("powerfusion: %s; %d region(s) run on ATen", why, len(part.kernels))
    elif part.kernels:
        report.codegen = gen.name
        # a kernel the generator cannot express stays ATen, every op of it reported with the reason
        reasons = [getattr(gen, "unsupported", lambda k: None)(k) for k in part.kernels]
        todo = [i for i, r in enumerate(reasons) if r is None]
        for k, r in zip(part.kernels, reasons):
            if r is not None:
                report.fallbacks.extend(Fallback(k.name, op, f"{gen.name} code generator: {r}") for op in k.ops)
        choices: list = [None] * len(part.kernels)
        for i in todo:
            choices[i] = search.choose(part.kernels[i], gen)
            if not stream and choices[i].mapping.stream:
                choices[i] = replace(choices[i], mapping=replace(choices[i].mapping, stream=False))
        try:
            pairs = [(part.kernels[i], choices[i].mapping) for i in todo]
            built = gen.build(pairs) if build is None else build(gen, pairs)
            for i, b in zip(todo, built):
                runners[i] = b
        except Exception as e:  # noqa: BLE001 - compiler missing or failing: ATen keeps it correct
            report.note = f"code generation failed: {e}"
            log.warning("powerfusion: code generation failed (%s); %d region(s) run on ATen", e, len(part.kernels))
            choices = [None] * len(part.kernels)
        for i, (k, c) in enumerate(zip(part.kernels, choices)):
            if reasons[i] is not None:
                continue
            reported.append(i)
            report.kernels.append(KernelReport(
                k.name, k.ops, k.rows, [tuple(v.size for v in s.vars) for s in k.spaces],
                c.mapping.key() if c else "-", c.predicted_s if c else float("nan"), c.n_candidates if c else 0,
                [b.name for b in k.inputs], [b.name for b in k.outputs], k))
    new_gm, calls = rebuild(gm, part, runners)
    for kr, i in zip(report.kernels, reported):
        kr.call = calls[i]
    for fb in part.fallbacks:
        (log.debug if fb.vendor else log.info)("powerfusion: %s (%s) stays ATen: %s", fb.node, fb.op, fb.reason)
    report.compile_s = time.perf_counter() - t0
    if not record:
        return new_gm
    report.seq = SEQ[0]
    SEQ[0] += 1
    REPORTS.append(report)
    del REPORTS[:-MAX_REPORTS]
    log.debug("powerfusion: %s: %d kernels, %d fallbacks, %.2fs", label, len(part.kernels), len(part.fallbacks),
              report.compile_s)
    return new_gm


def rebuild(gm: fx.GraphModule, part: Partition, runners: list) -> tuple[fx.GraphModule, list]:
    """New graph: regions become kernel calls, other nodes are copied; topologically ordered."""
    owned: dict[fx.Node, int] = {}
    for i, r in enumerate(part.regions):
        for n in r.nodes:
            if n not in r.inputs and _owned(r, n):
                owned[n] = i
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units: list[Any] = []  # fx.Node or region index
    seen_regions: set[int] = set()
    for n in gm.graph.nodes:
        if n in owned:
            if owned[n] not in seen_regions:
                seen_regions.add(owned[n])
                units.append(owned[n])
        else:
            units.append(n)

    def unit_inputs(u) -> list[fx.Node]:
        if isinstance(u, int):
            return list(part.regions[u].inputs)
        return list(u.all_input_nodes)

    def provider(n: fx.Node):
        return owned.get(n, n)

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    calls: list[RegionCall | None] = [None] * len(part.regions)  # by region index
    done: set = set()
    pending = list(units)
    # Kahn's algorithm keeping the original order as the priority
    while pending:
        progressed = False
        for u in list(pending):
            if all(provider(a) in done for a in unit_inputs(u)):
                if isinstance(u, int):
                    r = part.regions[u]
                    call = RegionCall(r, runners[u], f"powerfusion_{part.kernels[u].name}")
                    calls[u] = call
                    res = g.call_function(call, tuple(env[a] for a in r.inputs))
                    for j, o in enumerate(r.outputs):
                        env[o] = g.call_function(operator.getitem, (res, j))
                else:
                    env[u] = g.node_copy(u, lambda x: env[x])
                done.add(u)
                pending.remove(u)
                progressed = True
                break
        if not progressed:
            raise RuntimeError("powerfusion: region graph has a cycle (partitioner bug)")
    del order
    g.eliminate_dead_code()
    g.lint()
    return fx.GraphModule(gm, g), calls


def _owned(r: Region, n: fx.Node) -> bool:
    """Region nodes replaced by the kernel: everything except free nodes duplicated from outside."""
    return n in r.owned if r.owned is not None else True


class ShapeSpecialized:
    """Compiles a symbolic-shape graph once per concrete input shapes (cached) — or, in dynamic-batch mode
    and when the graph allows it, once for every size (``dynamic.compile_dynamic``)."""

    def __init__(self, gm: fx.GraphModule, label: str, codegen: str | None = None, dynamic_batch: bool = False):
        self.gm = gm
        self.label = label
        self.codegen = codegen
        self.cache: dict[tuple, Callable] = {}
        self.dynamic: Callable | None | bool = None if dynamic_batch else False  # None: not tried yet

    def __call__(self, *args):
        if self.dynamic is None:
            from bagualu.compiler.dynamic import compile_dynamic

            try:
                dyn, why = compile_dynamic(self.gm, self.label, self.codegen, self.per_shape)
            except Exception as e:  # noqa: BLE001 - the per-shape path is always there
                dyn, why = None, f"{type(e).__name__}: {e}"
            if dyn is None:
                log.info("powerfusion: %s compiles per shape, not once for every batch size: %s", self.label, why)
            self.dynamic = dyn or False
        if self.dynamic:
            return self.dynamic(*args)
        return self.per_shape(*args)

    def per_shape(self, *args):
        key = tuple((tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        fn = self.cache.get(key)
        if fn is None:
            fn = self.cache[key] = self._specialize(args)
        return fn(*args)

    def _specialize(self, args) -> Callable:
        """Re-trace the graph with these concrete inputs (shapes become constants), then compile it."""
        from torch.fx.experimental.proxy_tensor import make_fx

        concrete = make_fx(self.gm, tracing_mode="fake")(*args)
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        return _compile_static(concrete, f"{self.label} {shapes}", self.codegen)
