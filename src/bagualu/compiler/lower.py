"""Lower one fusion region (a set of ATen FX nodes) into a fusion-IR ``Kernel``.

The method is "pull": every node is a function from an index (symbolic ``Expr`` per dimension of the
node's shape) to an IR value. A pointwise op pulls its operands at the broadcast index, a view pulls its
input at a rearranged index, a row reduction pulls its input over an inner *space* and is memoised per
row. Region outputs are the roots: each is stored by walking a bijection from (row, space) to its
elements. Layout operators therefore never move data, and any node is recomputed where it is needed —
whether a space value is computed once and kept (materialised) is the mapping's decision, not this one's.

The row domain ``P`` is chosen from the region's reductions (their kept dimensions) or, for pointwise
regions, the largest output without its last dimension; candidates are tried in turn and the first that
lowers wins. Anything this cannot express raises ``LoweringError`` with the reason, and the partitioner
leaves that node to ATen.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from bagualu.compiler import index as ix
from bagualu.compiler.index import Expr, Var
from bagualu.compiler.ir import (
    COMPUTE_DTYPE,
    Buffer,
    Builder,
    ColReduce,
    FinalStore,
    Kernel,
    LocalBuf,
    Space,
    Store,
    Value,
)

TORCH_TO_IR = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64",
               torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "b8"}
IR_TO_TORCH = {v: k for k, v in TORCH_TO_IR.items()}
MAX_FINAL_NUMEL = 1 << 16  # column/full reduction outputs are finished serially after the row loop
# Inside a fused kernel, values the graph types as bf16/f16 stay fp32 and are rounded only where they are
# stored — a cast to bf16 whose result is computed with further is not rounded either (checked: Inductor's
# CPU kernels give exactly these results, e.g. for silu(x) * u and for x.to(bf16).float() * c). More
# accurate than eager, not bit-equal to it. Rounding every intermediate as eager does costs ~6 integer ops
# per op and per element, which on a CPU makes bf16 kernels compute-bound; tests hold bf16 to eager's own
# error against an fp64 reference instead.
EMULATE_PRECISION_CASTS = False


class LoweringError(Exception):
    """The region cannot be expressed; ``reason`` says why, ``node`` names the culprit (or None)."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason if node is None else f"{node.name} ({_target_name(node)}): {reason}")
        self.reason = reason
        self.node = node


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__name__", str(t))


def meta(node: Any) -> torch.Tensor:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        raise LoweringError("node has no tensor metadata", node if isinstance(node, fx.Node) else None)
    return v


def shape_of(node: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in meta(node).shape)


def ir_dtype(dtype: torch.dtype, node: fx.Node | None = None) -> str:
    try:
        return TORCH_TO_IR[dtype]
    except KeyError:
        raise LoweringError(f"dtype {dtype} is not supported by the code generators", node) from None


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class Region:
    nodes: list[fx.Node]  # topological order
    inputs: list[fx.Node] = field(default_factory=list)  # outside nodes read (filled by lowering)
    outputs: list[fx.Node] = field(default_factory=list)  # region nodes used outside
    owned: set[fx.Node] | None = None  # nodes the kernel replaces (None: all); the rest are duplicated views

    def node_set(self) -> set[fx.Node]:
        return set(self.nodes)


Lowering = Callable[["Ctx", fx.Node, tuple[Expr, ...]], Value]
LOWERINGS: dict[Any, Lowering] = {}  # filled by bagualu.compiler.lowerings


class Ctx:
    """State of one lowering attempt with row domain ``P``."""

    def __init__(self, region: Region, P: tuple[int, ...], name: str):
        self.region = region
        self.in_region = region.node_set()
        self.name = name
        self.b = Builder()
        self.P = tuple(P)
        self.outer = tuple(Var(f"o{i}", s) for i, s in enumerate(P) if s != 1)
        it = iter(self.outer)
        self.outer_index = tuple(ix.var(next(it)) if s != 1 else ix.const(0) for s in P)
        self.outer_flat = ix.linearize(self.outer_index, ix.contiguous_strides(self.P))
        self.spaces: dict[tuple[int, ...], Space] = {}
        self.inputs: list[Buffer] = []
        self.input_nodes: list[fx.Node] = []
        self.outputs: list[Buffer] = []
        self.locals: list[LocalBuf] = []
        self.stores: list[Store] = []
        self.col_reduces: list[ColReduce] = []
        self.col_of: dict[fx.Node, ColReduce] = {}
        self.final_stores: list[FinalStore] = []
        self.memo: dict[tuple, Value] = {}
        self.final_mode = False
        self.final_nodes = self._find_final_nodes()

    # ---- helpers used by the op lowerings -------------------------------------------------------
    def const(self, value: Any, dtype: str) -> Value:
        if dtype == "b8":
            value = bool(value)
        elif dtype in ("i64", "i32"):
            value = int(value)
        else:
            value = float(value)
        return self.b.make("const", (), dtype, value=value)

    def op(self, name: str, *args: Value, dtype: str | None = None, **attrs) -> Value:
        return self.b.make(name, tuple(args), dtype or args[0].dtype, **attrs)

    def cast(self, v: Value, compute: str) -> Value:
        """Convert to a compute dtype (no rounding to a storage type)."""
        if v.dtype == compute:
            return v
        if v.op == "const":
            return self.const(v.attrs["value"], compute)
        return self.b.make("cast", (v,), compute, to=compute)

    def round_to(self, v: Value, storage: str) -> Value:
        """Round a compute value to a storage dtype's precision (bf16/f16), keeping the compute dtype."""
        compute = COMPUTE_DTYPE[storage]
        v = self.cast(v, compute)
        if storage in ("bf16", "f16"):
            return self.b.make("cast", (v,), compute, to=storage)
        if storage in ("i8", "u8"):
            return self.b.make("cast", (v,), compute, to=storage)
        return v

    def index_value(self, e: Expr) -> Value:
        deps = frozenset(e.vars())
        for a in e.indirects():
            deps |= self.b.values[a.value_id].deps
        return self.b.make("index", (), "i64", deps=deps, expr=e)

    def space(self, sizes: tuple[int, ...]) -> Space:
        sizes = tuple(s for s in sizes if s != 1) or (1,)
        sp = self.spaces.get(sizes)
        if sp is None:
            k = len(self.spaces)
            sp = Space(f"s{k}", tuple(Var(f"s{k}_{i}", s) for i, s in enumerate(sizes)))
            self.spaces[sizes] = sp
        return sp

    def space_index(self, sp: Space, shape: tuple[int, ...]) -> tuple[Expr, ...]:
        """Index of ``shape`` (numel == sp.numel) walked by the vars of ``sp``."""
        it = iter(sp.vars)
        if tuple(s for s in shape if s != 1) == tuple(v.size for v in sp.vars):
            return tuple(ix.var(next(it)) if s != 1 else ix.const(0) for s in shape)
        flat = ix.linearize(tuple(ix.var(v) for v in sp.vars), ix.contiguous_strides(tuple(v.size for v in sp.vars)))
        return ix.delinearize(flat, shape)

    def split_rows(self, shape: tuple[int, ...]) -> tuple[tuple[Expr, ...], Space | None]:
        """An index of ``shape`` (numel = rows * m) over (rows, a space of numel m); space None when m == 1."""
        rows = numel(self.P)
        total = numel(shape)
        if total % rows != 0:
            raise LoweringError(f"shape {list(shape)} does not split into {rows} rows")
        m = total // rows
        prefix = 1
        for k in range(len(shape) + 1):
            if prefix == rows and numel(shape[k:]) == m:
                head = ix.delinearize(self.outer_flat, shape[:k]) if shape[:k] else ()
                if tuple(s for s in shape[:k] if s != 1) == tuple(s for s in self.P if s != 1):
                    it = iter(self.outer)
                    head = tuple(ix.var(next(it)) if s != 1 else ix.const(0) for s in shape[:k])
                if m == 1:
                    return head + tuple(ix.const(0) for _ in shape[k:]), None
                sp = self.space(shape[k:])
                return head + self.space_index(sp, shape[k:]), sp
            if k < len(shape):
                prefix *= shape[k]
        if m == 1:
            return ix.delinearize(self.outer_flat, shape), None
        sp = self.space((m,))
        flat = self.outer_flat * m + ix.var(sp.vars[0])
        return ix.delinearize(flat, shape), sp

    def _find_final_nodes(self) -> set[fx.Node]:
        """Column/full reductions (their kept part is not the row domain) and everything after them."""
        out: set[fx.Node] = set()
        rows = numel(self.P)
        for n in self.region.nodes:
            if n in out:
                continue
            if n.target in REDUCTIONS:
                x = n.args[0]
                kept = numel(shape_of(n))
                if kept != rows or (numel(shape_of(x)) == rows and rows != 1):
                    out.add(n)
                    continue
            if n.target in SCATTERS:
                out.add(n)
                continue
            if any(isinstance(a, fx.Node) and a in out for a in n.all_input_nodes):
                out.add(n)
        return out

    # ---- pulling values --------------------------------------------------------------------------
    def value_at(self, node: Any, idx: tuple[Expr, ...]) -> Value:
        if not isinstance(node, fx.Node):
            raise LoweringError(f"unexpected non-node operand {node!r}")
        key = (node, idx, self.final_mode)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if node not in self.in_region:
            v = self.load_input(node, idx)
        else:
            rule = LOWERINGS.get(node.target)
            if rule is None:
                raise LoweringError("no lowering for this op", node)
            try:
                v = rule(self, node, idx)
            except LoweringError:
                raise
            except Exception as e:  # an unforeseen case in a rule: leave the op to ATen, never crash
                raise LoweringError(f"internal lowering error ({type(e).__name__}: {e})", node) from e
            if EMULATE_PRECISION_CASTS and node not in self.final_nodes and not self.final_mode:
                v = self._emulate_precision(node, v)
        self.memo[key] = v
        return v

    def _emulate_precision(self, node: fx.Node, v: Value) -> Value:
        """Round results the graph types as bf16/f16 as eager does (off by default, see the constant)."""
        m = node.meta.get("val")
        if isinstance(m, torch.Tensor) and m.dtype in (torch.bfloat16, torch.float16) and v.dtype == "f32":
            if v.op == "cast" and v.attrs.get("to") in ("bf16", "f16"):
                return v
            if v.op in ("load", "const", "local_load") or (v.op == "cast" and v.args[0].op == "load"):
                return v
            return self.round_to(v, ir_dtype(m.dtype))
        return v

    def arg_at(self, arg: Any, out_shape: tuple[int, ...], idx: tuple[Expr, ...], compute: str) -> Value:
        """Operand ``arg`` (node or Python scalar) at broadcast index ``idx`` of ``out_shape``, as ``compute``."""
        if isinstance(arg, fx.Node):
            shp = shape_of(arg)
            if len(shp) > len(out_shape):
                raise LoweringError(f"operand of rank {len(shp)} broadcast to rank {len(out_shape)}", arg)
            off = len(out_shape) - len(shp)
            sub = tuple(ix.const(0) if s == 1 else idx[off + i] for i, s in enumerate(shp))
            return self.cast(self.value_at(arg, sub), compute)
        if isinstance(arg, (bool, int, float)):
            return self.const(arg, compute)
        raise LoweringError(f"unsupported operand {arg!r}")

    def load_input(self, node: fx.Node, idx: tuple[Expr, ...]) -> Value:
        t = meta(node)
        if node not in self.input_nodes:
            if t.numel() == 0:
                raise LoweringError("empty input", node)
            self.input_nodes.append(node)
            self.inputs.append(Buffer(node.name, ir_dtype(t.dtype, node), tuple(int(s) for s in t.shape),
                                      tuple(int(s) for s in t.stride())))
        k = self.input_nodes.index(node)
        buf = self.inputs[k]
        e = ix.linearize(idx, buf.strides)
        v = self._load(k, e, buf.dtype)
        return v

    def _load(self, k: int, e: Expr, dtype: str) -> Value:
        deps = frozenset(e.vars())
        args = tuple(self.b.values[a.value_id] for a in sorted(e.indirects(), key=lambda a: a.value_id))
        for a in args:
            deps |= a.deps
        return self.b.make("load", args, COMPUTE_DTYPE[dtype], deps=deps, buf=k, expr=e, storage=dtype)

    def row_reduce(self, node: fx.Node, idx: tuple[Expr, ...], kind: str, x: fx.Node, dims: list[int],
                   keepdim: bool, compute: str) -> Value:
        """A reduction at a row-level index: its body runs over a space of the reduced dims' sizes."""
        if self.final_mode:
            return self.accum(node, idx, keepdim, dims)
        xs = shape_of(x)
        dims = sorted(d % len(xs) for d in dims) if xs else []
        kept = [d for d in range(len(xs)) if d not in dims]
        for e in idx:
            if any(v not in self.outer for v in e.vars()):
                raise LoweringError("reduction result needed inside an inner loop (nested loops)", node)
        it = iter(idx)
        sub: list[Expr | None] = [None] * len(xs)
        for d in range(len(xs)):
            if d in kept:
                sub[d] = next(it)
            elif keepdim:
                next(it)
        sp = self.space(tuple(xs[d] for d in dims))
        red_idx = self.space_index(sp, tuple(xs[d] for d in dims))
        for d, e in zip(dims, red_idx):
            sub[d] = e
        body = self.cast(self.value_at(x, tuple(sub)), compute)
        deps = body.deps - set(sp.vars)
        return self.b.make("reduce", (body,), compute, deps=deps, kind=kind, space=sp)

    def accum(self, node: fx.Node, idx: tuple[Expr, ...], keepdim: bool, dims: list[int]) -> Value:
        cr = self.col_of.get(node)
        if cr is None:
            raise LoweringError("column reduction read before it was lowered", node)
        shp = shape_of(node)
        e = ix.linearize(idx, ix.contiguous_strides(shp))
        deps = frozenset(e.vars())
        return self.b.make("accum", (), cr.value.dtype, deps=deps, cr=cr.id, expr=e)

    # ---- roots --------------------------------------------------------------------------------------
    def lower_outputs(self) -> None:
        rows = numel(self.P)
        regular = [o for o in self.region.outputs if o not in self.final_nodes]
        final = [o for o in self.region.outputs if o in self.final_nodes]
        for o in regular:
            shp = shape_of(o)
            idx, sp = self.split_rows(shp)
            v = self.value_at(o, idx)
            out_k = self._add_output(o)
            e = ix.linearize(idx, self.outputs[out_k].strides)
            self.stores.append(Store(out_k, e, v))
            if sp is None and any(var not in self.outer for var in v.deps):
                raise LoweringError("row-level output depends on an inner loop", o)
        # column reductions reachable from final outputs, in graph order
        need = self._final_closure(final)
        for n in self.region.nodes:
            if n in need and (n.target in REDUCTIONS or n.target in SCATTERS):
                REDUCTIONS.get(n.target, SCATTERS.get(n.target))(self, n, None)  # type: ignore[misc]
        self.final_mode = True
        for o in final:
            shp = shape_of(o)
            if numel(shp) > MAX_FINAL_NUMEL:
                raise LoweringError(f"column-reduction output of {numel(shp)} elements is too large to finish "
                                    f"serially (limit {MAX_FINAL_NUMEL})", o)
            sp = self.space((numel(shp),)) if numel(shp) > 1 else None
            idx = ix.delinearize(ix.var(sp.vars[0]), shp) if sp else tuple(ix.const(0) for _ in shp)
            v = self.value_at(o, idx)
            out_k = self._add_output(o)
            self.final_stores.append(FinalStore(out_k, ix.linearize(idx, self.outputs[out_k].strides), v, sp))
        del rows

    def _final_closure(self, final: list[fx.Node]) -> set[fx.Node]:
        need, stack = set(), list(final)
        while stack:
            n = stack.pop()
            if n in need or n not in self.final_nodes:
                continue
            need.add(n)
            stack.extend(a for a in n.all_input_nodes if a in self.in_region)
        return need

    def add_col_reduce(self, node: fx.Node, kind: str, value: Value, size: int, slot: Expr) -> None:
        deps = set(value.deps) | slot.vars()
        for a in slot.indirects():
            deps |= self.b.values[a.value_id].deps
        sp = next((s for s in self.spaces.values() if deps & set(s.vars)), None)
        cr = ColReduce(len(self.col_reduces), kind, value, sp, size, slot)
        self.col_reduces.append(cr)
        self.col_of[node] = cr

    def space_of_value(self, v: Value) -> Space | None:
        for s in self.spaces.values():
            if v.deps & set(s.vars):
                return s
        return None

    def _add_output(self, node: fx.Node) -> int:
        """Buffer index of a region output: its position in ``region.outputs`` (the kernel returns them so)."""
        t = meta(node)
        shp = tuple(int(s) for s in t.shape)
        # the layout the traced graph recorded: AOTAutograd regenerates output aliases with as_strided
        strides = tuple(int(s) for s in t.stride())
        if not _dense(shp, strides):
            raise LoweringError(f"output layout {strides} for shape {list(shp)} is not dense", node)
        if not self.outputs:
            self.outputs = [None] * len(self.region.outputs)  # type: ignore[list-item]
        k = self.region.outputs.index(node)
        self.outputs[k] = Buffer(node.name, ir_dtype(t.dtype, node), shp, strides)
        return k

    def kernel(self) -> Kernel:
        spaces = list(self.spaces.values())
        ops = [_target_name(n) for n in self.region.nodes]
        return Kernel(self.name, self.inputs, self.outputs, self.outer, spaces, self.locals, self.stores,
                      self.col_reduces, self.final_stores, self.b.values, ops)


def _dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Non-overlapping and covering exactly numel elements (some permutation of a contiguous layout)."""
    dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


REDUCTIONS: dict[Any, Callable] = {}  # target -> lowering of it as a column reduction (ctx, node, None)
SCATTERS: dict[Any, Callable] = {}


def _candidate_domains(region: Region) -> list[tuple[int, ...]]:
    cands: list[tuple[int, ...]] = []
    for n in region.nodes:
        if n.target in REDUCTIONS and isinstance(n.args[0], fx.Node):
            xs = shape_of(n.args[0])
            dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(len(xs)))
            dims = [d % max(len(xs), 1) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            kept = tuple(xs[d] for d in range(len(xs)) if d not in dims)
            if kept and numel(kept) > 1:
                cands.append(kept)
        elif n.target is torch.ops.aten.topk.default:
            xs = shape_of(n.args[0])
            d = (n.args[2] if len(n.args) > 2 else -1) % len(xs)
            cands.append(tuple(s for i, s in enumerate(xs) if i != d))
    biggest = max(region.outputs, key=lambda o: numel(shape_of(o)), default=None)
    if biggest is not None:
        shp = shape_of(biggest)
        cands += [shp[:k] for k in range(len(shp) - 1, 0, -1)]
    for n in region.nodes:
        if isinstance(n.meta.get("val"), torch.Tensor):
            shp = shape_of(n)
            cands.append(shp[:-1] if len(shp) > 1 else ())
    cands.append(())
    seen, out = set(), []
    for c in cands:
        c = tuple(s for s in c if s != 1)
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


MAX_DOMAINS = 4  # successful row domains scored per region


def lower_region(region: Region, name: str, score: Callable[[Kernel], float] | None = None) -> Kernel:
    """Lower ``region`` (outputs filled in) to a kernel; raises ``LoweringError`` with the first reason.

    Without ``score`` the first row domain that lowers wins; with it (the cost model), up to
    ``MAX_DOMAINS`` that lower are scored and the cheapest wins — e.g. RoPE on q and k together runs one
    row per batch (each head block a clean inner space) rather than per (batch, head, position), where
    k's rows would not line up with q's.
    """
    from bagualu.compiler import lowerings  # noqa: F401  (fills LOWERINGS)

    if not region.outputs:
        raise LoweringError("region has no outputs")
    errors: list[LoweringError] = []
    found: list[tuple[float, int, Kernel, list[fx.Node]]] = []
    for P in _candidate_domains(region):
        ctx = Ctx(region, P, name)
        try:
            ctx.lower_outputs()
        except LoweringError as e:
            errors.append(e)
            continue
        k = ctx.kernel()
        if score is None:
            region.inputs = list(ctx.input_nodes)
            return k
        found.append((score(k), len(found), k, list(ctx.input_nodes)))
        if len(found) >= MAX_DOMAINS:
            break
    if found:
        _, _, k, inputs = min(found, key=lambda t: (t[0], t[1]))
        region.inputs = inputs
        return k
    raise errors[0] if errors else LoweringError("no row domain fits the region")


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
