"""Layout lowerings: views, permutes, slices, ``cat``/padding as index selects, items of splits, gathers."""

from __future__ import annotations

import operator

import torch

from bagualu.compiler import index as ix
from bagualu.compiler.index import Expr
from bagualu.compiler.ir import COMPUTE_DTYPE
from bagualu.compiler.lower import LOWERINGS, Ctx, LoweringError, numel, shape_of
from bagualu.compiler.lowerings.common import _arg, _out, const_of, indirect, register

aten = torch.ops.aten
prims = torch.ops.prims


# ---- layout (index rewriting only) ----------------------------------------------------------------------
@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, prims.reshape.default)
def _view(ctx, node, idx):
    shp, _ = _out(node)
    src_shape = shape_of(node.args[0])
    flat = ix.linearize(idx, ix.contiguous_strides(shp))
    return ctx.value_at(node.args[0], ix.delinearize(flat, src_shape))


@register(aten.permute.default)
def _permute(ctx, node, idx):
    dims = [d % len(idx) for d in node.args[1]]
    sub: list[Expr] = [None] * len(idx)  # type: ignore[list-item]
    for i, d in enumerate(dims):
        sub[d] = idx[i]
    return ctx.value_at(node.args[0], tuple(sub))


@register(aten.t.default, aten.transpose.int)
def _transpose(ctx, node, idx):
    n = len(idx)
    d0, d1 = (0, 1) if node.target is aten.t.default else (node.args[1] % n, node.args[2] % n)
    if n < 2:
        return ctx.value_at(node.args[0], idx)
    sub = list(idx)
    sub[d0], sub[d1] = idx[d1], idx[d0]
    return ctx.value_at(node.args[0], tuple(sub))


@register(aten.expand.default, prims.broadcast_in_dim.default)
def _expand(ctx, node, idx):
    src = shape_of(node.args[0])
    if node.target is prims.broadcast_in_dim.default:
        bdims = node.args[2]
        return ctx.value_at(node.args[0], tuple(ix.const(0) if src[i] == 1 else idx[d] for i, d in enumerate(bdims)))
    off = len(idx) - len(src)
    return ctx.value_at(node.args[0], tuple(ix.const(0) if s == 1 else idx[off + i] for i, s in enumerate(src)))


@register(aten.unsqueeze.default)
def _unsqueeze(ctx, node, idx):
    d = node.args[1] % len(idx)
    return ctx.value_at(node.args[0], idx[:d] + idx[d + 1:])


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(ctx, node, idx):
    src = shape_of(node.args[0])
    if node.target is aten.squeeze.default:
        dims = [i for i, s in enumerate(src) if s == 1]
    else:
        raw = node.args[1]
        dims = [d % max(len(src), 1) for d in (raw if isinstance(raw, (list, tuple)) else [raw])]
        dims = [d for d in dims if src and src[d] == 1]
    it = iter(idx)
    return ctx.value_at(node.args[0], tuple(ix.const(0) if i in dims else next(it) for i in range(len(src))))


def _slice_params(size: int, start, end, step) -> tuple[int, int]:
    start = 0 if start is None else start
    end = size if end is None else end
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    start = min(max(start, 0), size)
    return start, step


@register(aten.slice.Tensor)
def _slice(ctx, node, idx):
    src = shape_of(node.args[0])
    dim = _arg(node, 1, "dim", 0) % len(src)
    start, step = _slice_params(src[dim], _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
    sub = list(idx)
    sub[dim] = idx[dim] * step + start
    return ctx.value_at(node.args[0], tuple(sub))


@register(aten.select.int)
def _select(ctx, node, idx):
    src = shape_of(node.args[0])
    dim = node.args[1] % len(src)
    i = node.args[2] % src[dim]
    return ctx.value_at(node.args[0], idx[:dim] + (ix.const(i),) + idx[dim:])


@register(aten.flip.default)
def _flip(ctx, node, idx):
    src = shape_of(node.args[0])
    dims = [d % len(src) for d in node.args[1]]
    return ctx.value_at(node.args[0], tuple(ix.const(src[i] - 1) - e if i in dims else e for i, e in enumerate(idx)))


def _index_lt(ctx: Ctx, e: Expr, bound: int):
    return ctx.op("lt", ctx.index_value(e), ctx.const(bound, "i64"), dtype="b8")


@register(aten.cat.default)
def _cat(ctx, node, idx):
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    dim = _arg(node, 1, "dim", 0) % len(shp)
    parts = [p for p in node.args[0] if numel(shape_of(p)) > 0]
    offs, o = [], 0
    for p in parts:
        offs.append(o)
        o += shape_of(p)[dim]
    v = None
    for p, off in reversed(list(zip(parts, offs))):
        sub = list(idx)
        sub[dim] = idx[dim] - off
        pv = ctx.cast(ctx.value_at(p, tuple(sub)), comp)
        v = pv if v is None else ctx.op("where", _index_lt(ctx, idx[dim], off + shape_of(p)[dim]), pv, v, dtype=comp)
    return v


@register(aten.constant_pad_nd.default)
def _pad(ctx, node, idx):
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    src = shape_of(node.args[0])
    pad = list(node.args[1])
    value = _arg(node, 2, "value", 0)
    sub = list(idx)
    conds = []
    for k in range(len(pad) // 2):
        d = len(src) - 1 - k
        left, right = pad[2 * k], pad[2 * k + 1]
        if left < 0 or right < 0:
            raise LoweringError("negative padding (cropping)", node)
        sub[d] = idx[d] - left
        if left:
            conds.append(ctx.op("not", _index_lt(ctx, idx[d], left), dtype="b8"))
        if right:
            conds.append(_index_lt(ctx, idx[d], left + src[d]))
    v = ctx.cast(ctx.value_at(node.args[0], tuple(sub)), comp)
    if not conds:
        return v
    c = conds[0]
    for x in conds[1:]:
        c = ctx.op("and", c, x, dtype="b8")
    return ctx.op("where", c, v, const_of(ctx, value, dt), dtype=comp)


def _getitem(ctx: Ctx, node, idx):
    src, k = node.args
    t = src.target
    if t in (aten.split_with_sizes.default, aten.split.Tensor):
        shp = shape_of(src.args[0])
        dim = _arg(src, 2, "dim", 0) % len(shp)
        if t is aten.split.Tensor:
            size = src.args[1]
            sizes = [min(size, shp[dim] - i) for i in range(0, shp[dim], size)]
        else:
            sizes = list(src.args[1])
        sub = list(idx)
        sub[dim] = idx[dim] + sum(sizes[:k])
        return ctx.value_at(src.args[0], tuple(sub))
    if t is aten.unbind.int:
        dim = _arg(src, 1, "dim", 0) % (len(idx) + 1)
        return ctx.value_at(src.args[0], idx[:dim] + (ix.const(k),) + idx[dim:])
    if t is aten.topk.default:
        from bagualu.compiler.lowerings.reduce import topk_item

        return topk_item(ctx, node, src, k, idx)
    raise LoweringError("getitem of an unsupported multi-output op", node)


LOWERINGS[operator.getitem] = _getitem


# ---- gathers --------------------------------------------------------------------------------------------
@register(aten.gather.default)
def _gather(ctx, node, idx):
    src = shape_of(node.args[0])
    dim = node.args[1] % len(src)
    i = ctx.value_at(node.args[2], idx)
    sub = list(idx)
    sub[dim] = indirect(ctx, i, src[dim])
    return ctx.value_at(node.args[0], tuple(sub))


@register(aten.index_select.default)
def _index_select(ctx, node, idx):
    src = shape_of(node.args[0])
    dim = node.args[1] % len(src)
    i = ctx.value_at(node.args[2], (idx[dim],) if shape_of(node.args[2]) else ())
    sub = list(idx)
    sub[dim] = indirect(ctx, i, src[dim])
    return ctx.value_at(node.args[0], tuple(sub))
