"""PowerFusion's fusion IR: one kernel = loads, local buffers, compute micro-ops, reductions, stores, mapping.

A kernel iterates an *outer* domain of rows (``outer`` vars; the loop a mapping may split across threads)
and, per row, one or more *spaces* (inner loops over e.g. the hidden, vocabulary or expert dimension).
Every value has a level, found from the loop variables it depends on:

    global  — depends on no variable: computed once before the row loop
    row     — depends on outer vars only (a row reduction's result, a per-row scalar)
    space S — depends on S's vars (an element): computed inside a loop over S, possibly in several passes

Effects (``Stmt``) say what a row produces: ``Store`` to global memory at a row or space level;
``ColReduce`` accumulations across rows (per-thread partials, combined after the row loop) and
``FinalStore`` of values computed from those accumulators (the epilogue of a column or full reduction).
Row reductions (``reduce``) and row top-k (``topk``) turn space values into row values; top-k fills a
small *local buffer* that later micro-ops read with ``local_load``.

What this IR deliberately does not say is *how* the row loop is split and the inner loops vectorised:
that is ``Mapping``, chosen by the search (``search.py``) and honoured by each code generator. A new chip
needs only a code generator for this IR; the lowering, the search space and the cost model are shared.

Dtypes are strings: storage dtypes ``f32 bf16 f16 f64 i64 i32 i8 u8 b8`` and compute dtypes ``f32 f64 i64
i32 b8`` (low-precision floats compute in f32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bagualu.compiler.index import Expr, Var

# storage dtype -> compute dtype
COMPUTE_DTYPE = {"f32": "f32", "bf16": "f32", "f16": "f32", "f64": "f64", "i64": "i64", "i32": "i32",
                 "i8": "i32", "u8": "i32", "b8": "b8"}

# micro-ops by arity; anything else is structural (const, index, load, local_load, reduce, topk_*)
UNARY = {"neg", "abs", "exp", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt", "reciprocal", "sigmoid",
         "tanh", "sin", "cos", "erf", "floor", "ceil", "trunc", "round", "sign", "not", "isnan", "relu",
         "square"}
BINARY = {"add", "sub", "mul", "div", "max", "min", "pow", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
          "xor", "atan2", "fmod", "remainder", "floordiv"}
TERNARY = {"where"}
REDUCE_KINDS = {"sum", "max", "min", "prod", "any", "all"}


@dataclass(frozen=True)
class Buffer:
    """A tensor in global memory the kernel reads (input) or writes (output)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i64": 8, "i32": 4, "i8": 1, "u8": 1, "b8": 1}[self.dtype]


@dataclass(frozen=True)
class Space:
    """An inner iteration space of a row: its vars, outermost first (the last one is vectorised)."""

    name: str
    vars: tuple[Var, ...]

    @property
    def numel(self) -> int:
        n = 1
        for v in self.vars:
            n *= v.size
        return n


@dataclass(frozen=True)
class LocalBuf:
    """A per-row buffer in local memory (registers/L1 on CPU, registers/shared memory on GPU)."""

    name: str
    dtype: str  # compute dtype
    size: int


@dataclass(eq=False)
class Value:
    """One SSA micro-op. ``attrs`` by op: const{value}, index{expr}, load{buf, expr}, local_load{local, expr},
    cast{to}, reduce{kind, space}, topk_values/topk_indices{k, space, largest, local}, accum{stmt}."""

    id: int
    op: str
    args: tuple["Value", ...]
    dtype: str
    attrs: dict[str, Any] = field(default_factory=dict)
    deps: frozenset[Var] = frozenset()  # loop vars this value depends on

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items() if k not in ("space",))
        if "space" in self.attrs:
            extra += f", space={self.attrs['space'].name}"
        a = ", ".join(f"v{x.id}" for x in self.args)
        return f"v{self.id} = {self.op}({a}{', ' if a and extra else ''}{extra}) : {self.dtype}"


@dataclass(eq=False)
class Store:
    buf: int  # index into Kernel.outputs
    index: Expr
    value: Value


@dataclass(eq=False)
class ColReduce:
    """Accumulate ``value`` over rows into a per-thread partial at ``index`` (over ``space`` vars or a scalar).

    ``index`` may be indirect (scatter-add into a small histogram). Partials are combined after the row
    loop; ``FinalStore`` values read the combined result through an ``accum`` value.
    """

    id: int
    kind: str
    value: Value
    space: Space | None  # None: a scalar accumulator (or a histogram indexed by ``index``)
    size: int  # number of accumulator slots
    index: Expr  # slot of this row's/element's contribution


@dataclass(eq=False)
class FinalStore:
    """After the row loop: ``out[index] = value`` for every point of ``space`` (None: a single element)."""

    buf: int
    index: Expr
    value: Value
    space: Space | None


@dataclass
class Mapping:
    """How a kernel runs on the machine: the search's decision, honoured by the code generator.

    parallel: ``"rows"`` splits the outer loop across threads; ``"tiles"`` (pointwise kernels) splits each
    pass's (row, outermost inner variable) pairs, for when there are fewer rows than threads; ``"serial"``
    runs one thread (tiny kernels, where forking threads costs more than the work). vector: SIMD lanes of
    the innermost loop (0 = let the compiler choose). materialize: ids of space values computed once into
    a per-row local buffer and read back by later passes instead of being recomputed. row_block: rows per
    scheduling chunk (0 = static). prefetch: later passes over a row fetch the next row's inputs ahead, so
    memory traffic overlaps the compute-heavy passes instead of alternating with them. stream: contiguous
    stores bypass the caches (non-temporal), for kernels whose traffic exceeds the last-level cache: a
    cached store first reads the line it writes (write-allocate), a third of a copy's traffic, and
    what it leaves in the cache is evicted before anyone reads it.
    """

    parallel: str = "rows"
    vector: int = 0
    materialize: frozenset[int] = frozenset()
    row_block: int = 0
    prefetch: bool = False
    stream: bool = False

    def key(self) -> str:
        m = ",".join(str(i) for i in sorted(self.materialize))
        return (f"{self.parallel}/v{self.vector}/m[{m}]/b{self.row_block}{'/pf' if self.prefetch else ''}"
                f"{'/nt' if self.stream else ''}")


@dataclass(eq=False)
class Kernel:
    """A fused region as one kernel: ``outer`` rows, each running the row program."""

    name: str
    inputs: list[Buffer]
    outputs: list[Buffer]
    outer: tuple[Var, ...]
    spaces: list[Space]
    locals: list[LocalBuf]
    stores: list[Store]
    col_reduces: list[ColReduce]
    final_stores: list[FinalStore]
    values: list[Value]  # every value, in a valid topological order
    ops: list[str] = field(default_factory=list)  # the aten ops fused (for explain)

    @property
    def rows(self) -> int:
        n = 1
        for v in self.outer:
            n *= v.size
        return n

    def space_of(self, value: Value) -> Space | None:
        """The space a value lives in (None: row or global level)."""
        for s in self.spaces:
            if value.deps & set(s.vars):
                return s
        return None

    def is_final(self, value: Value) -> bool:
        """Computed after the row loop, from combined column accumulators."""
        return value.op == "accum" or any(self.is_final(a) for a in value.args)

    def level(self, value: Value) -> str:
        if self.is_final(value):
            return "final"
        s = self.space_of(value)
        if s is not None:
            return s.name
        return "row" if value.deps & set(self.outer) else "global"

    def pretty(self) -> str:
        lines = [f"kernel {self.name}: rows {'x'.join(str(v.size) for v in self.outer) or '1'} "
                 f"({', '.join(v.name for v in self.outer)})"]
        for s in self.spaces:
            lines.append(f"  space {s.name}: " + ", ".join(f"{v.name}<{v.size}" for v in s.vars))
        for b in self.inputs:
            lines.append(f"  in  {b.name}: {b.dtype}{list(b.shape)} strides {list(b.strides)}")
        for b in self.outputs:
            lines.append(f"  out {b.name}: {b.dtype}{list(b.shape)}")
        for v in self.values:
            lines.append(f"  [{self.level(v)}] {v!r}")
        for s in self.stores:
            lines.append(f"  store {self.outputs[s.buf].name}[{s.index!r}] = v{s.value.id}")
        for c in self.col_reduces:
            lines.append(f"  colreduce#{c.id} {c.kind}[{c.index!r}] += v{c.value.id}")
        for f in self.final_stores:
            lines.append(f"  final {self.outputs[f.buf].name}[{f.index!r}] = v{f.value.id}")
        return "\n".join(lines)


class Builder:
    """Creates values with dependency tracking and hash-consing (equal micro-ops are built once)."""

    def __init__(self, id_base: int = 0) -> None:
        self.values: list[Value] = []
        self.id_base = id_base
        self._memo: dict[tuple, Value] = {}

    def _key(self, op: str, args: tuple[Value, ...], dtype: str, attrs: dict) -> tuple:
        def norm(x):
            if isinstance(x, (Space, LocalBuf)):
                return x.name
            if isinstance(x, float) and x != x:
                return "nan"
            return x

        return (op, tuple(a.id for a in args), dtype, tuple(sorted((k, norm(v)) for k, v in attrs.items())))

    def make(self, op: str, args: tuple[Value, ...], dtype: str, deps: frozenset[Var] | None = None,
             **attrs) -> Value:
        key = self._key(op, args, dtype, attrs)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if deps is None:
            deps = frozenset().union(*(a.deps for a in args)) if args else frozenset()
        v = Value(self.id_base + len(self.values), op, args, dtype, attrs, deps)
        self.values.append(v)
        self._memo[key] = v
        return v
