"""Helpers shared by the lowering rules: argument access, output metadata, type promotion, registration."""

from __future__ import annotations

import torch
import torch.fx as fx

from bagualu.compiler import index as ix
from bagualu.compiler.index import Expr, Indirect
from bagualu.compiler.ir import COMPUTE_DTYPE
from bagualu.compiler.lower import LOWERINGS, Ctx, ir_dtype, meta

aten = torch.ops.aten
prims = torch.ops.prims


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _out(node: fx.Node) -> tuple[tuple[int, ...], str]:
    m = meta(node)
    return tuple(int(s) for s in m.shape), ir_dtype(m.dtype, node)


def _promoted(node: fx.Node, args) -> str:
    """Compute dtype of ``args`` under torch's type promotion (comparisons compare in it)."""
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

    protos = []
    for a in args:
        if isinstance(a, fx.Node):
            m = meta(a)
            protos.append(torch.empty(() if m.dim() == 0 else (0,), dtype=m.dtype))
        elif isinstance(a, (bool, int, float)):
            protos.append(a)
    if not any(isinstance(p, torch.Tensor) for p in protos):
        return "f32"
    comp, _ = elementwise_dtypes(*protos, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
    return COMPUTE_DTYPE[ir_dtype(comp, node)]


def register(*targets):
    def deco(fn):
        for t in targets:
            LOWERINGS[t] = fn
        return fn
    return deco



def const_of(ctx: Ctx, value, dt: str):
    """A constant of storage dtype ``dt`` (rounded to bf16/f16 as a tensor of that dtype would hold it)."""
    if dt in ("bf16", "f16"):
        value = torch.tensor(float(value), dtype=torch.bfloat16 if dt == "bf16" else torch.float16).item()
    return ctx.const(value, COMPUTE_DTYPE[dt])


def indirect(ctx: Ctx, v, size: int) -> Expr:
    v = ctx.cast(v, "i64")
    if v.op == "index":
        return v.attrs["expr"]
    if v.op == "const":
        return ix.const(int(v.attrs["value"]) % size)
    return ix.atom(Indirect(v.id, size))
