"""Order a kernel's row program into passes, and specialise values on a loop segment.

Shared by every code generator: a *pass* is one loop over a space (or a block of row-level statements)
that computes every item whose inputs are ready — row reductions, top-k scans, stores, column
accumulations. Items of the same space with no dependency between them share a pass, so RMSNorm's
sum of squares and its residual store are one loop and its normalised store a second; softmax is
max / sum-of-exp / store. Fewer passes mean fewer trips through the cache, and a value needed by
several passes is either recomputed in each or materialised once (``Mapping.materialize``).

``specialize`` rewrites values for one segment of the innermost loop (``d`` in ``[lo, hi)``): index
comparisons that the segment decides fold to constants, so ``cat`` and padding leave no select in the
vectorised loop and no out-of-range load in the branch not taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bagualu.compiler import index as ix
from bagualu.compiler.index import Expr, Indirect, Var
from bagualu.compiler.ir import Builder, Kernel, Space, Value

ROW_RESULTS = ("reduce", "topk")
CHEAP = {"load", "const", "index", "cast", "local_load"}


@dataclass(eq=False)
class Item:
    kind: str  # reduce | topk | store | colreduce
    space: Space | None  # None: a row-level statement
    value: Value  # what the item evaluates per point (the body for reduce/topk)
    obj: object  # the reduce/topk Value, the Store or the ColReduce
    deps: set[int] = field(default_factory=set)  # ids of reduce/topk values it needs


@dataclass(eq=False)
class Pass:
    space: Space | None
    items: list[Item]


def row_results(v: Value, memo: dict[int, set[int]]) -> set[int]:
    """Ids of the reduce/topk values ``v`` needs (stopping at them: they are computed before)."""
    hit = memo.get(v.id)
    if hit is not None:
        return hit
    out: set[int] = set()
    for a in v.args:
        if a.op in ROW_RESULTS:
            out.add(a.id)
        else:
            out |= row_results(a, memo)
    memo[v.id] = out
    return out


def is_global(v: Value, memo: dict[int, bool]) -> bool:
    """Computed once per kernel call: no loop variable, no row result, no column accumulator."""
    hit = memo.get(v.id)
    if hit is None:
        hit = not v.deps and v.op not in ROW_RESULTS and v.op != "accum" and v.op != "local_load" \
            and all(is_global(a, memo) for a in v.args)
        memo[v.id] = hit
    return hit


def items_of(k: Kernel) -> list[Item]:
    memo: dict[int, set[int]] = {}
    items: list[Item] = []
    for v in k.values:
        if v.op in ROW_RESULTS:
            body = v.args[0]
            items.append(Item(v.op, v.attrs["space"], body, v, row_results(body, memo) | (
                {body.id} if body.op in ROW_RESULTS else set())))
    for st in k.stores:
        sp = k.space_of(st.value) or next((s for s in k.spaces if st.index.vars() & set(s.vars)), None)
        items.append(Item("store", sp, st.value, st, _deps_of(st.value, memo)))
    for cr in k.col_reduces:
        deps = _deps_of(cr.value, memo)
        for a in cr.index.indirects():
            deps |= _deps_of(k.values[a.value_id], memo)
        items.append(Item("colreduce", cr.space, cr.value, cr, deps))
    return items


def _deps_of(v: Value, memo) -> set[int]:
    return ({v.id} if v.op in ROW_RESULTS else set()) | row_results(v, memo)


def schedule(k: Kernel) -> list[Pass]:
    """Greedy: repeatedly run every ready item of one space together (topk scans get their own pass)."""
    remaining = items_of(k)
    order = {id(it): i for i, it in enumerate(remaining)}
    done: set[int] = set()
    passes: list[Pass] = []
    while remaining:
        ready = [it for it in remaining if it.deps <= done]
        if not ready:
            raise RuntimeError(f"kernel {k.name}: cyclic row dependencies")
        first = min(ready, key=lambda it: order[id(it)])
        if first.kind == "topk":
            group = [first]
        else:
            group = [it for it in ready if it.space is first.space and it.kind != "topk"]
        passes.append(Pass(first.space, group))
        for it in group:
            remaining.remove(it)
            if it.kind in ROW_RESULTS:
                done.add(it.obj.id)  # type: ignore[attr-defined]
    return passes


def span(b) -> int:
    """Elements from a buffer's first to its last addressed element (what an index must stay below)."""
    return 1 + sum((s - 1) * st for s, st in zip(b.shape, b.strides))


def may_leave(e: Expr, span_: int) -> bool:
    """Whether index ``e`` can, by its bounds, fall outside ``[0, span_)``: the generators clamp such a load."""
    lo, hi = e.bounds()
    return lo < 0 or hi >= span_


def indirect_sizes(k: Kernel) -> dict[int, int]:
    """value id -> the extent each value used as a gather/scatter index must lie in (the smallest of its
    uses): the code generators range-check and clamp these values where they are defined."""
    out: dict[int, int] = {}
    exprs = [v.attrs["expr"] for v in k.values if isinstance(v.attrs.get("expr"), Expr)]
    for e in exprs + [cr.index for cr in k.col_reduces]:
        for a in e.indirects():
            out[a.value_id] = min(a.size, out.get(a.value_id, a.size))
    return out


def values_needed(roots: list[Value], stop_row_results: bool = True) -> list[Value]:
    """Every value ``roots`` depend on (row results are leaves), in topological (id) order."""
    seen: dict[int, Value] = {}
    stack = list(roots)
    while stack:
        v = stack.pop()
        if v.id in seen:
            continue
        seen[v.id] = v
        if stop_row_results and v.op in ROW_RESULTS and v not in roots:
            continue
        stack.extend(v.args)
    return [seen[i] for i in sorted(seen)]


def uses_by_pass(k: Kernel, passes: list[Pass]) -> dict[int, list[int]]:
    """value id -> indices of the passes that evaluate it (space values only)."""
    out: dict[int, list[int]] = {}
    for pi, p in enumerate(passes):
        if p.space is None:
            continue
        for v in values_needed([it.value for it in p.items]):
            if k.space_of(v) is p.space and v.op not in ROW_RESULTS:
                out.setdefault(v.id, []).append(pi)
    return out


def materialize_candidates(k: Kernel, passes: list[Pass]) -> list[int]:
    """Space values recomputed by several passes that cost more than a load: worth keeping per row."""
    uses = uses_by_pass(k, passes)
    multi = {vid for vid, ps in uses.items() if len(ps) > 1 and k.values[vid].op not in CHEAP}
    # keep the outermost ones: drop a candidate whose every multi-pass reader is itself a candidate
    readers: dict[int, set[int]] = {}
    for v in k.values:
        for a in v.args:
            readers.setdefault(a.id, set()).add(v.id)
    out = []
    for vid in sorted(multi):
        rs = readers.get(vid, set())
        if rs and all(r in multi for r in rs):
            continue
        out.append(vid)
    return out


def materialized_outputs(k: Kernel, passes: list[Pass], m) -> dict[int, Item]:
    """Materialised values that the pass computing them first also stores, whole, to an fp32 or bf16
    output, with nothing streamed: later passes read that output back (its row is cache-hot) instead of
    a separate fp32 row buffer — one stream of stores less (the C generator does; the cost model charges
    them no buffer store). A bf16 output gives back the stored, rounded value: what eager computes from
    the half tensor it materialises (and Inductor reads back too)."""
    out: dict[int, Item] = {}
    if not m.materialize or m.stream or m.parallel == "tiles":
        return out
    for vid in m.materialize:
        v = k.values[vid]
        first = next((p for p in passes if p.space is not None
                      and any(u.id == vid for u in values_needed([it.value for it in p.items]))), None)
        store = None if first is None else next(
            (it for it in first.items if it.kind == "store" and it.value.id == vid
             and k.outputs[it.obj.buf].dtype in ("f32", "bf16")), None)
        if store is not None and v.dtype == "f32":
            out[vid] = store
    return out


# ---- segment specialisation ---------------------------------------------------------------------------
def split_points(values: list[Value], v: Var) -> list[int]:
    """Boundaries of ``v`` where an index comparison ``index(v + c) < bound`` changes value."""
    pts: set[int] = set()
    for x in values:
        if x.op in ("lt", "ge", "le", "gt") and x.args[0].op == "index" and x.args[1].op == "const":
            e: Expr = x.args[0].attrs["expr"]
            if e.coeff(v) == 1 and all(a == v for a, _ in e.terms):
                bound = int(x.args[1].attrs["value"]) - e.const
                if x.op in ("le", "gt"):
                    bound += 1
                if 0 < bound < v.size:
                    pts.add(bound)
    return sorted(pts)


class Specializer:
    """Rebuilds values with ``v -> v' + lo`` on a segment, folding comparisons the segment decides."""

    def __init__(self, k: Kernel, subs: dict[Var, Expr], id_base: int):
        self.k = k
        self.subs = subs
        self.b = Builder(id_base)
        self.map: dict[int, Value] = {}

    def _make(self, op, args, dtype, deps, **attrs) -> Value:
        return self.b.make(op, tuple(args), dtype, deps=deps, **attrs)

    def expr(self, e: Expr) -> Expr:
        m = {a: ix.var(b) if isinstance(b, Var) else b for a, b in self.subs.items()}
        ind = {}
        for a in e.indirects():
            nv = self.map.get(a.value_id)
            if nv is not None and nv.id != a.value_id:
                ind[a] = ix.atom(Indirect(nv.id, a.size))
        return e.subs({**m, **ind})

    def value(self, v: Value) -> Value:
        hit = self.map.get(v.id)
        if hit is not None:
            return hit
        if not (v.deps & set(self.subs)):
            self.map[v.id] = v
            return v
        args = [self.value(a) for a in v.args]
        attrs = dict(v.attrs)
        if "expr" in attrs:
            attrs["expr"] = self.expr(attrs["expr"])
        deps = frozenset()
        for a in args:
            deps |= a.deps
        if "expr" in attrs:
            deps |= frozenset(attrs["expr"].vars())
        out = None
        if v.op in ("lt", "le", "gt", "ge") and args[0].op == "index" and args[1].op == "const":
            lo, hi = args[0].attrs["expr"].bounds()
            c = args[1].attrs["value"]
            decided = {"lt": (hi < c, lo >= c), "le": (hi <= c, lo > c), "gt": (lo > c, hi <= c),
                       "ge": (lo >= c, hi < c)}[v.op]
            if decided[0] or decided[1]:
                out = self._make("const", (), "b8", frozenset(), value=bool(decided[0]))
        elif v.op == "where" and args[0].op == "const":
            out = args[1] if args[0].attrs["value"] else args[2]
        elif v.op == "not" and args[0].op == "const":
            out = self._make("const", (), "b8", frozenset(), value=not args[0].attrs["value"])
        elif v.op == "and" and any(a.op == "const" for a in args):
            c = [a for a in args if a.op == "const"][0]
            other = args[1] if c is args[0] else args[0]
            out = other if c.attrs["value"] else c
        if out is None:
            out = self._make(v.op, args, v.dtype, deps, **attrs)
        self.map[v.id] = out
        return out


def segments(size: int, points: list[int]) -> list[tuple[int, int]]:
    cuts = [0] + [p for p in points if 0 < p < size] + [size]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]

