"""Pointwise lowerings: arithmetic, comparisons, selects, transcendental functions, creation and casts."""

from __future__ import annotations

import math

import torch

from bagualu.compiler.ir import COMPUTE_DTYPE
from bagualu.compiler.lower import EMULATE_PRECISION_CASTS, LOWERINGS, Ctx, LoweringError, ir_dtype, meta
from bagualu.compiler.lowerings.common import _arg, _out, _promoted, const_of, register

aten = torch.ops.aten
prims = torch.ops.prims


# ---- pointwise ------------------------------------------------------------------------------------------
UNARY = {aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp", aten.expm1.default: "expm1",
         aten.log.default: "log", aten.log1p.default: "log1p", aten.log2.default: "log2",
         aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt", aten.reciprocal.default: "reciprocal",
         aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh", aten.sin.default: "sin",
         aten.cos.default: "cos", aten.erf.default: "erf", aten.floor.default: "floor", aten.ceil.default: "ceil",
         aten.trunc.default: "trunc", aten.round.default: "round", aten.sign.default: "sign",
         aten.relu.default: "relu"}
INT_IDENTITY = {"floor", "ceil", "trunc", "round"}


def _unary(ctx: Ctx, node, idx):
    shp, dt = _out(node)
    name = UNARY[node.target]
    comp = COMPUTE_DTYPE[dt]
    x = ctx.arg_at(node.args[0], shp, idx, comp)
    if comp in ("i64", "i32") and name in INT_IDENTITY:
        return x
    if comp == "b8":
        raise LoweringError(f"{name} on bool", node)
    if comp in ("i64", "i32") and name not in ("neg", "abs", "sign", "relu"):
        raise LoweringError(f"{name} on integers", node)
    return ctx.op(name, x)


for _t in UNARY:
    LOWERINGS[_t] = _unary


@register(aten.exp2.default)
def _exp2(ctx, node, idx):
    shp, dt = _out(node)
    x = ctx.arg_at(node.args[0], shp, idx, COMPUTE_DTYPE[dt])
    return ctx.op("exp", ctx.op("mul", x, ctx.const(math.log(2.0), x.dtype)))


@register(aten.log10.default)
def _log10(ctx, node, idx):
    shp, dt = _out(node)
    x = ctx.arg_at(node.args[0], shp, idx, COMPUTE_DTYPE[dt])
    return ctx.op("div", ctx.op("log", x), ctx.const(math.log(10.0), x.dtype))


BINARY = {aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
          aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div", aten.div.Scalar: "div",
          aten.maximum.default: "max", aten.minimum.default: "min", aten.pow.Tensor_Tensor: "pow",
          aten.pow.Scalar: "pow", aten.atan2.default: "atan2"}
COMPARE = {aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
           aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
           aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge"}
LOGICAL = {aten.logical_and.default: "and", aten.logical_or.default: "or", aten.logical_xor.default: "xor",
           aten.bitwise_and.Tensor: "and", aten.bitwise_or.Tensor: "or", aten.bitwise_xor.Tensor: "xor"}


def _binary(ctx: Ctx, node, idx):
    shp, dt = _out(node)
    name = BINARY[node.target]
    comp = COMPUTE_DTYPE[dt]
    if comp == "b8" and name not in ("max", "min"):
        raise LoweringError(f"{name} on bool", node)
    a = ctx.arg_at(node.args[0], shp, idx, comp)
    b = ctx.arg_at(node.args[1], shp, idx, comp)
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1 and name in ("add", "sub"):
        b = ctx.op("mul", b, ctx.const(alpha, comp))
    if name == "div" and comp in ("i64", "i32"):
        raise LoweringError("integer true division", node)
    if name in ("pow", "atan2") and comp in ("i64", "i32"):
        raise LoweringError(f"integer {name}", node)
    return ctx.op(name, a, b)


for _t in BINARY:
    LOWERINGS[_t] = _binary


def _compare(ctx: Ctx, node, idx):
    shp, _ = _out(node)
    comp = _promoted(node, node.args[:2])
    a = ctx.arg_at(node.args[0], shp, idx, comp)
    b = ctx.arg_at(node.args[1], shp, idx, comp)
    return ctx.op(COMPARE[node.target], a, b, dtype="b8")


for _t in COMPARE:
    LOWERINGS[_t] = _compare


def _logical(ctx: Ctx, node, idx):
    shp, dt = _out(node)
    if dt != "b8":
        raise LoweringError("bitwise op on integers", node)
    a = ctx.arg_at(node.args[0], shp, idx, "b8")
    b = ctx.arg_at(node.args[1], shp, idx, "b8")
    return ctx.op(LOGICAL[node.target], a, b, dtype="b8")


for _t in LOGICAL:
    LOWERINGS[_t] = _logical


@register(aten.logical_not.default, aten.bitwise_not.default)
def _not(ctx, node, idx):
    shp, dt = _out(node)
    if dt != "b8":
        raise LoweringError("bitwise not on integers", node)
    return ctx.op("not", ctx.arg_at(node.args[0], shp, idx, "b8"), dtype="b8")


@register(aten.isnan.default)
def _isnan(ctx, node, idx):
    shp, _ = _out(node)
    comp = _promoted(node, node.args[:1])
    return ctx.op("isnan", ctx.arg_at(node.args[0], shp, idx, comp), dtype="b8")


@register(aten.pow.Tensor_Scalar)
def _pow_scalar(ctx, node, idx):
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    x = ctx.arg_at(node.args[0], shp, idx, comp)
    e = node.args[1]
    if comp in ("i64", "i32", "b8"):
        if isinstance(e, int) and 0 <= e <= 4:
            pass
        else:
            raise LoweringError(f"integer pow by {e!r}", node)
    if e == 0:
        return ctx.const(1, comp)
    if e == 1:
        return x
    if e == 2:
        return ctx.op("mul", x, x)
    if e == 3:
        return ctx.op("mul", ctx.op("mul", x, x), x)
    if e == 4:
        sq = ctx.op("mul", x, x)
        return ctx.op("mul", sq, sq)
    if e == 0.5:
        return ctx.op("sqrt", x)
    if e == -0.5:
        return ctx.op("rsqrt", x)
    if e == -1:
        return ctx.op("reciprocal", x)
    if e == -2:
        return ctx.op("reciprocal", ctx.op("mul", x, x))
    return ctx.op("pow", x, ctx.const(e, comp))


@register(aten.where.self)
def _where(ctx, node, idx):
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    c = ctx.arg_at(node.args[0], shp, idx, "b8")
    a = ctx.arg_at(node.args[1], shp, idx, comp)
    b = ctx.arg_at(node.args[2], shp, idx, comp)
    return ctx.op("where", c, a, b, dtype=comp)


@register(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.clamp.Tensor,
          aten.clamp_min.Tensor, aten.clamp_max.Tensor)
def _clamp(ctx, node, idx):
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    x = ctx.arg_at(node.args[0], shp, idx, comp)
    t = node.target
    if t in (aten.clamp_min.default, aten.clamp_min.Tensor):
        lo, hi = node.args[1], None
    elif t in (aten.clamp_max.default, aten.clamp_max.Tensor):
        lo, hi = None, node.args[1]
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    if lo is not None:
        x = ctx.op("max", x, ctx.arg_at(lo, shp, idx, comp))
    if hi is not None:
        x = ctx.op("min", x, ctx.arg_at(hi, shp, idx, comp))
    return x


@register(aten.div.Tensor_mode)
def _div_mode(ctx, node, idx):
    shp, dt = _out(node)
    comp = COMPUTE_DTYPE[dt]
    mode = node.kwargs.get("rounding_mode", _arg(node, 2, "rounding_mode"))
    if comp not in ("f32", "f64"):
        raise LoweringError("integer division with a rounding mode", node)
    q = ctx.op("div", ctx.arg_at(node.args[0], shp, idx, comp), ctx.arg_at(node.args[1], shp, idx, comp))
    if mode is None:
        return q
    return ctx.op("floor" if mode == "floor" else "trunc", q)


# ---- creation, casts, copies ----------------------------------------------------------------------------
@register(aten.full.default, aten.full_like.default, aten.scalar_tensor.default)
def _full(ctx, node, idx):
    _, dt = _out(node)
    value = node.args[0] if node.target is aten.scalar_tensor.default else node.args[1]
    if not isinstance(value, (bool, int, float)):
        raise LoweringError("fill value is not a constant", node)
    return const_of(ctx, value, dt)


@register(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(ctx, node, idx):
    _, dt = _out(node)
    if node.target is aten.arange.default:
        start, step = 0, 1
    else:
        start = node.args[0]
        step = _arg(node, 2, "step", 1) if node.target is aten.arange.start_step else 1
    comp = COMPUTE_DTYPE[dt]
    if all(isinstance(v, int) for v in (start, step)):
        iv = ctx.index_value(idx[0] * step + start)
        return ctx.cast(iv, comp)
    i = ctx.cast(ctx.index_value(idx[0]), comp)
    return ctx.op("add", ctx.op("mul", i, ctx.const(step, comp)), ctx.const(start, comp))


@register(prims.iota.default)
def _iota(ctx, node, idx):
    _, dt = _out(node)
    start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    return ctx.cast(ctx.index_value(idx[0] * int(step) + int(start)), COMPUTE_DTYPE[dt])


@register(aten._to_copy.default, prims.convert_element_type.default)
def _to_copy(ctx, node, idx):
    shp, dt = _out(node)
    src = node.args[0]
    sm = meta(src)
    if tuple(sm.shape) != shp:
        raise LoweringError("copy with a shape change", node)
    if node.kwargs.get("device") is not None and torch.device(node.kwargs["device"]) != sm.device:
        raise LoweringError("device transfer", node)
    v = ctx.value_at(src, idx)
    if dt in ("i8", "u8") or (dt in ("bf16", "f16") and EMULATE_PRECISION_CASTS):
        return ctx.round_to(v, dt)
    if dt in ("bf16", "f16"):  # rounded where it is stored; in registers it stays fp32, as Inductor keeps it
        return ctx.cast(v, COMPUTE_DTYPE[dt])
    comp = COMPUTE_DTYPE[dt]
    if comp == "b8":
        return ctx.op("ne", v, ctx.const(0, v.dtype), dtype="b8")
    return ctx.cast(v, comp)


@register(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)
def _identity(ctx, node, idx):
    return ctx.value_at(node.args[0], idx)


@register(aten.copy.default)
def _copy(ctx, node, idx):
    shp, dt = _out(node)
    v = ctx.arg_at(node.args[1], shp, idx, COMPUTE_DTYPE[ir_dtype(meta(node.args[1]).dtype)])
    return ctx.round_to(v, dt) if dt in ("bf16", "f16") and EMULATE_PRECISION_CASTS else ctx.cast(v, COMPUTE_DTYPE[dt])
