"""Dynamic-batch mode: one compilation of a graph serves every value of its one symbolic dimension.

A serving engine's graphs change only in the number of tokens per step; compiling per shape (the default
for symbolic graphs, ``graph.ShapeSpecialized``) would compile once per token count. In this mode
(``torch.compile(..., backend="powerfusion", options={"dynamic_batch": True})``), a graph whose symbolic
sizes all depend on a single symbol ``B`` is compiled once:

1. it is traced twice on fake tensors, with ``B`` set to two large sentinels ``H1``, ``H2`` (no memory is
   allocated); index simplifications that the lowering justifies from value ranges then hold for every
   ``B`` up to the sentinels, i.e. for any real size;
2. both traces are partitioned, searched and turned into code (C or Triton) by the usual pipeline;
3. the two results are *anti-unified*: the two sources must be token for token identical except for
   integer literals ``c1``/``c2`` that are one affine function of the sentinel (``c = a*B + b``, found
   from the pair), which become expressions of a runtime argument ``n0`` (a Triton kernel's grid and
   column partials follow it too); likewise every integer argument of the graph's remaining ATen nodes
   (view sizes, …) and every buffer shape and stride. Anything else that differs — a float derived from
   ``B`` (a mean over the batch), a size not affine in it, a different fusion — and the graph is
   compiled per shape instead, as without this mode;
4. the generalised source is built once; the graph takes ``B`` from its symbolic-int input.

A region called with inputs laid out differently than compiled for makes that call fall back to the
per-shape path, so a result is never computed by a kernel built for another layout.
"""

from __future__ import annotations

import ctypes
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx

from bagualu.compiler.ir import Kernel
from bagualu.compiler.lower import IR_TO_TORCH
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

H1 = (1 << 30) + 7  # sentinels for the symbolic size: large (so ranges cover any real size), distinct,
H2 = (1 << 31) - 1  # and small enough that a 4-D tensor's element count stays within int64
MAX_OFFSET = 1 << 20  # |b| of an affine constant a*B + b: larger is a coincidence, not a derived size


class LayoutMismatch(Exception):
    """A dynamic region got inputs laid out differently than compiled for (caught by ``DynamicGraph``)."""


def affine(c1: int, c2: int) -> tuple[int, int] | None:
    """``(a, b)`` with ``c1 == a*H1 + b`` and ``c2 == a*H2 + b`` (a ≠ 0 and |b| small), or None."""
    d = c1 - c2
    if d % (H1 - H2):
        return None
    a = d // (H1 - H2)
    b = c1 - a * H1
    if a == 0 or abs(b) > MAX_OFFSET:
        return None
    return a, b


def at(t: tuple[int, int] | int, n: int) -> int:
    return t if isinstance(t, int) else t[0] * n + t[1]


def _template(v1: int, v2: int) -> tuple[int, int] | int | None:
    if v1 == v2:
        return v1
    return affine(v1, v2)


# ---- the symbol and the sentinel traces ----------------------------------------------------------------
def the_symbol(gm: fx.GraphModule):
    """The single free symbol of the graph's input sizes, or None (none, or several)."""
    syms = set()
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt):
            syms |= v.node.expr.free_symbols
        elif isinstance(v, torch.Tensor):
            for s in list(v.shape) + list(v.stride()):
                if isinstance(s, torch.SymInt):
                    syms |= s.node.expr.free_symbols
        elif v is None:
            return None
    return next(iter(syms)) if len(syms) == 1 else None


def _eval(s, sym, h: int) -> int:
    if isinstance(s, torch.SymInt):
        return int(s.node.expr.subs({sym: h}))
    return int(s)


def trace_at(gm: fx.GraphModule, sym, h: int) -> fx.GraphModule:
    """``gm`` re-traced with the symbol set to ``h``, on fake tensors (shapes become constants)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    args = []
    with mode:
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            v = n.meta["val"]
            if isinstance(v, torch.Tensor):
                args.append(torch.empty_strided([_eval(s, sym, h) for s in v.shape],
                                                [_eval(s, sym, h) for s in v.stride()], dtype=v.dtype,
                                                device=v.device))
            else:
                args.append(_eval(v, sym, h))
        return make_fx(gm, tracing_mode="real")(*args)


# ---- C sources -------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"0[xX][0-9a-fA-F.]+[pP][+-]?\d+[fF]?|[A-Za-z_]\w*|\d+(?:LL|ll|L|l)?|\s+|.")


def c_affine(a: int, b: int) -> str:
    return f"((int64_t){a}LL * n0 + {b}LL)"


def py_affine(a: int, b: int) -> str:
    return f"({a} * n0 + {b})"


def generalize_source(src1: str, src2: str, spell: Callable[[int, int], str] = c_affine) -> str | None:
    """The source (C, or Triton's Python with ``spell=py_affine``) valid for any size: sentinel-derived
    integer literals become ``a*n0 + b``."""
    t1, t2 = _TOKEN.findall(src1), _TOKEN.findall(src2)
    if len(t1) != len(t2):
        return None
    out = []
    for a, b in zip(t1, t2):
        if a == b:
            out.append(a)
            continue
        if not (a[:1].isdigit() and b[:1].isdigit()) or a.startswith(("0x", "0X")) or b.startswith(("0x", "0X")):
            return None
        fa = affine(int(a.rstrip("Ll")), int(b.rstrip("Ll")))
        if fa is None:
            return None
        out.append(spell(*fa))
    return "".join(out)


class _DynKernel:
    """A kernel compiled once for every size: shapes and strides are affine templates in the size."""

    device_type = "cpu"

    def __init__(self, k1: Kernel, k2: Kernel):
        self.kernel = k1
        self.__name__ = k1.name
        self.ins = [self._layout(a, b) for a, b in zip(k1.inputs, k2.inputs)]
        self.outs = [self._layout(a, b) for a, b in zip(k1.outputs, k2.outputs)]
        self.nbuf = len(self.ins) + len(self.outs)

    @staticmethod
    def _layout(b1, b2):
        shape = [_template(x, y) for x, y in zip(b1.shape, b2.shape)]
        strides = [_template(x, y) for x, y in zip(b1.strides, b2.strides)]
        if any(t is None for t in shape + strides) or b1.dtype != b2.dtype:
            raise ValueError(f"buffer {b1.name}: layout not affine in the symbolic size")
        return IR_TO_TORCH[b1.dtype], shape, strides

    def matches(self, inputs, n: int) -> bool:
        for t, (dt, shape, strides) in zip(inputs, self.ins):
            want = tuple(at(s, n) for s in shape)
            if t.dtype != dt or tuple(t.shape) != want or t.device.type != self.device_type:
                return False
            if t.numel() > 1 and any(st != at(w, n) for st, w, sz in zip(t.stride(), strides, want) if sz > 1):
                return False
        return True

    def outputs(self, n: int, device) -> list[torch.Tensor]:
        return [torch.empty_strided([at(s, n) for s in shape], [at(s, n) for s in strides], dtype=dt, device=device)
                for dt, shape, strides in self.outs]


class DynCpuKernel(_DynKernel):
    """A C kernel with the size as its ``n0`` argument."""

    def __init__(self, k1: Kernel, k2: Kernel, fn):
        super().__init__(k1, k2)
        self.fn = fn
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int64

    def __call__(self, *inputs, n0: int):
        outs = self.outputs(n0, "cpu")
        ptrs = (ctypes.c_void_p * self.nbuf)(*[t.data_ptr() for t in inputs], *[t.data_ptr() for t in outs])
        err = self.fn(ptrs, torch.get_num_threads(), n0)
        if err:
            raise IndexError(f"powerfusion kernel {self.kernel.name}: an index of a gather/scatter is out of range "
                             f"(ops: {', '.join(self.kernel.ops)})")
        return tuple(outs)


class DynTritonKernel(_DynKernel):
    """A Triton kernel with the size as its ``n0`` argument; the grid and the column partials follow it."""

    def __init__(self, k1: Kernel, k2: Kernel, m, fn, final_fn, uses_err: bool, device_type: str):
        super().__init__(k1, k2)
        from bagualu.compiler.codegen import schedule as sch
        from bagualu.compiler.codegen.gpu import _IDENT

        self.device_type = device_type
        self.fn, self.final_fn, self.m, self.uses_err = fn, final_fn, m, uses_err
        self.rows = _template(k1.rows, k2.rows)
        widest = [max(p.space.numel for p in sch.schedule(k) if p.space is not None) if m.parallel == "tiles" else 0
                  for k in (k1, k2)]
        self.widest = _template(*widest)
        self.parts = [(_template(c1.size, c2.size), IR_TO_TORCH[c1.value.dtype], _IDENT[c1.kind])
                      for c1, c2 in zip(k1.col_reduces, k2.col_reduces)]
        if self.rows is None or self.widest is None or any(p[0] is None for p in self.parts):
            raise ValueError(f"kernel {k1.name}: its grid is not affine in the symbolic size")

    def __call__(self, *inputs, n0: int):
        dev = inputs[0].device
        rows = at(self.rows, n0)
        if self.m.parallel == "tiles":
            grid, nprog = (rows, -(-at(self.widest, n0) // self.m.vector)), 1
        else:
            nprog = -(-rows // max(1, self.m.row_block))
            grid = (nprog,)
        outs = self.outputs(n0, dev)
        parts = []
        for size, dt, ident in self.parts:
            if not dt.is_floating_point and ident != 0:
                ident = torch.iinfo(dt).min if ident < 0 else torch.iinfo(dt).max
            parts.append(torch.full((nprog * at(size, n0),), ident, dtype=dt, device=dev))
        err = [torch.zeros(1, dtype=torch.int32, device=dev)] if self.uses_err else []
        self.fn[grid](*inputs, *outs, *parts, *err, n0)
        if self.final_fn is not None:
            self.final_fn[(1,)](*inputs, *outs, *parts, n0)
        if self.uses_err and int(err[0].item()):
            raise IndexError(f"powerfusion kernel {self.kernel.name}: an index of a gather/scatter is out of range "
                             f"(ops: {', '.join(self.kernel.ops)})")
        return tuple(outs)


class DynRegionCall:
    """A fused region in a dynamic graph: its kernel, given the runtime size as the last argument."""

    def __init__(self, kernel: _DynKernel, name: str):
        self.runner = kernel
        self.__name__ = name
        self.__module__ = __name__
        self.n_kernel_inputs = len(kernel.ins)

    def __call__(self, *args):
        n = args[-1]
        kin = args[:self.n_kernel_inputs]
        if not self.runner.matches(kin, n):
            raise LayoutMismatch(self.__name__)
        return self.runner(*kin, n0=n)


# ---- graphs ------------------------------------------------------------------------------------------
def generalize_graph(g1: fx.GraphModule, g2: fx.GraphModule, sym_pos: int,
                     make_region: Callable[[Any, Any], DynRegionCall]) -> fx.GraphModule | None:
    """One graph for every size from two sentinel graphs: differing integer arguments become arithmetic on
    the size input (placeholder ``sym_pos``); each pair of region calls becomes ``make_region(c1, c2)``."""
    n1, n2 = list(g1.graph.nodes), list(g2.graph.nodes)
    if len(n1) != len(n2):
        return None
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    size_node = None
    from bagualu.compiler.graph import RegionCall

    class Mismatch(Exception):
        pass

    def gen(a, b):
        if isinstance(a, fx.Node):
            if not isinstance(b, fx.Node) or n1.index(a) != n2.index(b):
                raise Mismatch
            return env[a]
        if isinstance(a, (list, tuple)):
            if type(a) is not type(b) or len(a) != len(b):
                raise Mismatch
            return type(a)(gen(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            if a.keys() != b.keys():
                raise Mismatch
            return {k: gen(a[k], b[k]) for k in a}
        if isinstance(a, bool) or not isinstance(a, int) or not isinstance(b, int) or type(a) is not type(b):
            if a != b or type(a) is not type(b):
                raise Mismatch
            return a
        t = _template(a, b)
        if t is None:
            raise Mismatch
        if isinstance(t, int):
            return t
        scaled = size_node if t[0] == 1 else g.call_function(operator.mul, (size_node, t[0]))
        return scaled if t[1] == 0 else g.call_function(operator.add, (scaled, t[1]))

    try:
        ph = 0
        for a, b in zip(n1, n2):
            if a.op != b.op:
                raise Mismatch
            if a.op == "placeholder":
                env[a] = g.placeholder(a.name)
                if ph == sym_pos:
                    size_node = env[a]
                ph += 1
                continue
            if a.op == "output":
                g.output(gen(a.args[0], b.args[0]))
                continue
            if a.op != "call_function":
                raise Mismatch
            if isinstance(a.target, RegionCall):
                if not isinstance(b.target, RegionCall):
                    raise Mismatch
                args = gen(a.args, b.args)
                env[a] = g.call_function(make_region(a.target, b.target), tuple(args) + (size_node,))
                continue
            if a.target != b.target:
                raise Mismatch
            env[a] = g.call_function(a.target, gen(a.args, b.args), gen(a.kwargs, b.kwargs))
    except (Mismatch, ValueError):
        return None
    if size_node is None:
        return None
    g.lint()
    return fx.GraphModule(g1, g)


class DynamicGraph:
    """Runs the generalised graph; a layout it was not compiled for goes to the per-shape path."""

    def __init__(self, gm: fx.GraphModule, per_shape: Callable[..., Any]):
        self.gm = gm
        self.per_shape = per_shape

    def __call__(self, *args):
        try:
            return self.gm(*args)
        except LayoutMismatch as e:
            log.info("powerfusion: dynamic-batch region %s got another layout; compiling this shape", e)
            return self.per_shape(*args)


class _Planned:
    """Stands in for a kernel while the sentinel graphs are planned (they are never run)."""

    def __init__(self, kernel: Kernel, mapping):
        self.kernel, self.mapping = kernel, mapping

    def matches(self, inputs) -> bool:
        return False


def compile_dynamic(gm: fx.GraphModule, label: str, codegen: str | None,
                    per_shape: Callable[..., Any]) -> tuple[DynamicGraph | None, str]:
    """The dynamic-batch compilation of a symbolic graph, or (None, why it cannot be one)."""
    from bagualu.compiler import graph as G
    from bagualu.compiler.codegen import build as cbuild

    sym = the_symbol(gm)
    if sym is None:
        return None, "its sizes depend on several symbols (or an input has no recorded size)"
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pos = next((i for i, n in enumerate(phs) if isinstance(n.meta.get("val"), torch.SymInt)
                and n.meta["val"].node.expr == sym), None)
    if pos is None:
        return None, "no input carries the symbolic size itself"
    plans = []
    for h in (H1, H2):
        cap: dict = {}

        def plan(gen, pairs, cap=cap):
            cap["gen"], cap["pairs"] = gen, list(pairs)
            return [_Planned(k, m) for k, m in pairs]

        # no streamed stores: planned at huge sentinel sizes, the kernels serve small batches too, whose
        # outputs the next operator should find in the cache
        new = G._compile_static(trace_at(gm, sym, h), f"{label} [dynamic batch]", codegen, build=plan,
                                record=h == H1, stream=False)
        plans.append((new, cap))
    (g1, c1), (g2, c2) = plans
    lib = mod = None
    name = getattr(c1.get("gen"), "name", None)
    if c1:
        if len(c1["pairs"]) != len(c2.get("pairs", ())) or name not in ("cpp", "triton"):
            return None, f"the two plans differ, or code generator {name!r} has no dynamic-batch support"
        if name == "cpp":
            gen = c1["gen"]
            src = generalize_source(gen.source(c1["pairs"]), gen.source(c2["pairs"]))
        else:
            from bagualu.compiler.codegen.gpu import interpreting, module_source

            src = generalize_source(module_source(c1["pairs"], interpreting()),
                                    module_source(c2["pairs"], interpreting()), py_affine)
        if src is None:
            return None, "a kernel's code depends on the size other than through affine integer constants"
        if name == "cpp":
            lib, _secs, _hit = cbuild.build(src)
        else:
            from bagualu.compiler.codegen.gpu import load_module

            mod = load_module(src)

    def make_region(r1, r2) -> DynRegionCall:
        if not isinstance(r1.runner, _Planned) or not isinstance(r2.runner, _Planned):
            raise ValueError("a region without a kernel")
        k1, k2 = r1.runner.kernel, r2.runner.kernel
        if lib is not None:
            return DynRegionCall(DynCpuKernel(k1, k2, getattr(lib, k1.name)), r1.__name__)
        from bagualu.compiler.codegen.triton_src import TritonWriter

        m = r1.runner.mapping
        kern = DynTritonKernel(k1, k2, m, getattr(mod, k1.name), getattr(mod, f"{k1.name}_final", None),
                               TritonWriter(k1, m, False).uses_err, c1["gen"].device_type())
        return DynRegionCall(kern, r1.__name__)

    g = generalize_graph(g1, g2, pos, make_region)
    if g is None:
        return None, "the graph's sizes are not affine in the symbolic size (or the two plans differ)"
    return DynamicGraph(g, per_shape), ""
