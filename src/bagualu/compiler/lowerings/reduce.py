"""Reduction lowerings: row reductions, column reductions and scatter-add (per-thread partials), top-k."""

from __future__ import annotations

import torch
import torch.fx as fx

from bagualu.compiler import index as ix
from bagualu.compiler.index import Expr
from bagualu.compiler.ir import COMPUTE_DTYPE
from bagualu.compiler.lower import LOWERINGS, REDUCTIONS, SCATTERS, Ctx, LoweringError, ir_dtype, meta, numel, shape_of
from bagualu.compiler.lowerings.common import _arg, _out, indirect, register

aten = torch.ops.aten
prims = torch.ops.prims


# ---- reductions ----------------------------------------------------------------------------------------
RED_KIND = {aten.sum.dim_IntList: "sum", aten.sum.default: "sum", aten.mean.dim: "mean", aten.mean.default: "mean",
            aten.amax.default: "max", aten.amin.default: "min", aten.prod.dim_int: "prod",
            aten.prod.default: "prod", aten.any.dim: "any", aten.any.dims: "any", aten.any.default: "any",
            aten.all.dim: "all", aten.all.default: "all", aten.all.dims: "all"}


def _red_params(node) -> tuple[list[int], bool]:
    xs = shape_of(node.args[0])
    t = node.target
    if t in (aten.sum.default, aten.mean.default, aten.prod.default, aten.any.default, aten.all.default):
        return list(range(len(xs))), False
    dims = _arg(node, 1, "dim")
    keep = bool(_arg(node, 2, "keepdim", False))
    if dims is None or dims == []:
        dims = list(range(len(xs)))
    if isinstance(dims, int):
        dims = [dims]
    if not xs:  # a 0-dim tensor "reduced" over dim 0 or -1: the element itself
        return [], keep
    return [d % len(xs) for d in dims], keep


def _expand(idx, xs, dims, keep):
    """The input index of a reduction's output index (reduced dims at 0)."""
    it = iter(idx)
    out = []
    for d in range(len(xs)):
        if d in dims:
            if keep:
                next(it)
            out.append(ix.const(0))
        else:
            out.append(next(it))
    return out


def _reduction(ctx: Ctx, node, idx):
    kind = RED_KIND[node.target]
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt] if kind not in ("any", "all") else "b8"
    dims, keep = _red_params(node)
    x = node.args[0]
    xs = shape_of(x)
    if numel(tuple(xs[d] for d in dims)) == 1 and not ctx.final_mode:  # over one element: the element
        v = ctx.value_at(x, tuple(_expand(idx, xs, dims, keep)))
        return ctx.op("ne", v, ctx.const(0, v.dtype), dtype="b8") if comp == "b8" and v.dtype != "b8" \
            else ctx.cast(v, comp)
    if ctx.final_mode:
        v = ctx.accum(node, idx, keep, dims)
    else:
        v = ctx.row_reduce(node, idx, "sum" if kind == "mean" else kind, x, dims, keep, comp)
    if kind == "mean":
        xs = shape_of(x)
        n = numel(tuple(xs[d] for d in dims))
        v = ctx.op("div", v, ctx.const(n, comp))
    return v


def _col_reduction(ctx: Ctx, node, _idx):
    kind = RED_KIND[node.target]
    _, dt = _out(node)
    comp = COMPUTE_DTYPE[dt] if kind not in ("any", "all") else "b8"
    dims, _ = _red_params(node)
    x = node.args[0]
    xs = shape_of(x)
    xidx, _sp = ctx.split_rows(xs)
    kept = [d for d in range(len(xs)) if d not in dims]
    kept_shape = tuple(xs[d] for d in kept)
    slot = ix.linearize(tuple(xidx[d] for d in kept), ix.contiguous_strides(kept_shape))
    body = ctx.cast(ctx.value_at(x, xidx), comp)
    ctx.add_col_reduce(node, "sum" if kind == "mean" else kind, body, numel(kept_shape), slot)


for _t in RED_KIND:
    LOWERINGS[_t] = _reduction
    REDUCTIONS[_t] = _col_reduction


@register(aten.scatter_add.default)
def _scatter_add_final(ctx, node, idx):
    if not ctx.final_mode:
        raise LoweringError("scatter-add result used inside the row loop", node)
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    base = ctx.arg_at(node.args[0], shp, idx, comp)
    return ctx.op("add", base, ctx.accum(node, idx, True, []))


def _scatter_add_col(ctx: Ctx, node, _idx):
    base, dim, index, src = node.args[:4]
    out_shape, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    ishape = shape_of(index)
    if shape_of(src) != ishape:
        raise LoweringError("scatter_add with src larger than index", node)
    dim = dim % len(out_shape)
    iidx, _sp = ctx.split_rows(ishape)
    dest = list(iidx)
    dest[dim] = indirect(ctx, ctx.value_at(index, iidx), out_shape[dim])
    slot = ix.linearize(tuple(dest), ix.contiguous_strides(out_shape))
    body = ctx.cast(ctx.value_at(src, iidx), comp)
    ctx.add_col_reduce(node, "sum", body, numel(out_shape), slot)


SCATTERS[aten.scatter_add.default] = _scatter_add_col


# ---- top-k --------------------------------------------------------------------------------------------
@register(aten.topk.default)
def _topk_direct(ctx, node, idx):
    raise LoweringError("top-k used without getitem", node)


def topk_item(ctx: Ctx, item: fx.Node, node: fx.Node, which: int, idx: tuple[Expr, ...]):
    from bagualu.compiler.ir import LocalBuf

    x = node.args[0]
    xs = shape_of(x)
    k = node.args[1]
    dim = _arg(node, 2, "dim", -1) % len(xs)
    largest = _arg(node, 3, "largest", True)
    if not _arg(node, 4, "sorted", True):
        raise LoweringError("top-k with sorted=False (eager's order is unspecified)", node)
    if ctx.final_mode:
        raise LoweringError("top-k after a column reduction", node)
    row_idx = idx[:dim] + idx[dim + 1:]
    for e in row_idx:
        if any(v not in ctx.outer for v in e.vars()):
            raise LoweringError("top-k needed inside an inner loop", node)
    comp = COMPUTE_DTYPE[ir_dtype(meta(x).dtype)]
    if comp not in ("f32", "f64"):
        raise LoweringError("top-k of integers", node)
    sp = ctx.space((xs[dim],))
    sub = row_idx[:dim] + ctx.space_index(sp, (xs[dim],)) + row_idx[dim:]
    body = ctx.cast(ctx.value_at(x, sub), comp)
    key = ("topk", node.name, body.id)
    bufs = ctx.memo.get(key)
    if bufs is None:
        lv = LocalBuf(f"tv{len(ctx.locals)}", comp, k)
        li = LocalBuf(f"ti{len(ctx.locals) + 1}", "i64", k)
        ctx.locals += [lv, li]
        deps = body.deps - set(sp.vars)
        t = ctx.b.make("topk", (body,), comp, deps=deps, k=k, space=sp, largest=bool(largest), vals=lv, idxs=li)
        ctx.memo[key] = bufs = t
    t = bufs
    j = idx[dim]
    local = t.attrs["vals"] if which == 0 else t.attrs["idxs"]
    deps = t.deps | frozenset(j.vars())
    return ctx.b.make("local_load", (t,), local.dtype, deps=deps, local=local, expr=j)
