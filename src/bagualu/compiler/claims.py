"""The operators PowerFusion claims, each tied to the OpInfo entry that tests it: the fusible set.

``CLAIMS`` is the single source of truth. The partitioner fuses an ATen op only if some claim lists it
(``aten``) for the node's dtype; ``tests/unit/test_compiler_opinfo.py`` iterates the same list and, for
each claim, runs PyTorch's own OpInfo samples (``torch.testing._internal.common_methods_invocations``)
compiled vs eager, forward and backward, and checks every listed ATen op was actually fused. A lowering
rule without a claim is never used (the op stays ATen, "not claimed"), so nothing is fused untested.

``kind``: ``pointwise``/``reduction`` samples run as they are; ``layout``/``creation`` outputs get a
pointwise consumer (a lone view or ``full`` is left to ATen: fusing it alone would only add a copy).
``composite`` claims are torch functions our decomposition table splits into claimed ATen ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

F32, BF16, I64, B8 = "float32", "bfloat16", "int64", "bool"
FLOATS = (F32, BF16)
NUMERIC = (F32, BF16, I64)


@dataclass(frozen=True)
class Claim:
    opinfo: str  # OpInfo name
    aten: tuple[str, ...]  # ATen overloads this claim makes fusible (and its test must see fused)
    dtypes: tuple[str, ...] = FLOATS
    kind: str = "pointwise"  # pointwise | reduction | layout | creation | composite
    variant: str = ""  # OpInfo variant_test_name
    backward: bool = True
    samples: int = 2  # OpInfo samples run per dtype


def _u(name, aten=None, dtypes=FLOATS, **kw):
    return Claim(name, (aten or f"aten.{name}.default",), dtypes, **kw)


CLAIMS: list[Claim] = [
    # pointwise, floating point
    *[_u(n) for n in ("exp", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt", "reciprocal", "sigmoid", "tanh",
                      "sin", "cos", "erf")],
    _u("exp2", "aten.exp2.default"), _u("log10", "aten.log10.default"),
    # pointwise, also integers
    *[_u(n, dtypes=NUMERIC) for n in ("neg", "abs", "sign", "floor", "ceil", "trunc")],
    _u("round", dtypes=FLOATS),
    Claim("nn.functional.relu", ("aten.relu.default",), NUMERIC),
    Claim("add", ("aten.add.Tensor",), NUMERIC),
    Claim("sub", ("aten.sub.Tensor",), NUMERIC),
    Claim("mul", ("aten.mul.Tensor",), NUMERIC),
    Claim("div", ("aten.div.Tensor",), FLOATS, variant="no_rounding_mode"),
    Claim("div", ("aten.div.Tensor_mode",), FLOATS, variant="floor_rounding"),
    Claim("div", ("aten.div.Tensor_mode",), FLOATS, variant="trunc_rounding"),
    Claim("maximum", ("aten.maximum.default",), NUMERIC),
    Claim("minimum", ("aten.minimum.default",), NUMERIC),
    Claim("pow", ("aten.pow.Tensor_Tensor",), FLOATS),
    Claim("atan2", ("aten.atan2.default",), (F32,)),
    *[Claim(n, (f"aten.{n}.Tensor",), NUMERIC, backward=False) for n in ("eq", "ne", "lt", "le", "gt", "ge")],
    Claim("logical_and", ("aten.logical_and.default",), (B8,), backward=False),
    Claim("logical_or", ("aten.logical_or.default",), (B8,), backward=False),
    Claim("logical_xor", ("aten.logical_xor.default",), (B8,), backward=False),
    Claim("logical_not", ("aten.logical_not.default",), (B8, F32), backward=False),
    Claim("bitwise_and", ("aten.bitwise_and.Tensor",), (B8,), backward=False),
    Claim("bitwise_or", ("aten.bitwise_or.Tensor",), (B8,), backward=False),
    Claim("bitwise_not", ("aten.bitwise_not.default",), (B8,), backward=False),
    Claim("isnan", ("aten.isnan.default",), FLOATS, backward=False),
    Claim("where", ("aten.where.self",), NUMERIC),
    Claim("clamp", ("aten.clamp.Tensor",), FLOATS),
    Claim("clamp_min", ("aten.clamp.Tensor",), FLOATS),
    Claim("clamp_max", ("aten.clamp.Tensor",), FLOATS),
    # creation and casts
    Claim("full_like", ("aten.full_like.default",), (F32, I64), kind="creation", backward=False),
    Claim("arange", ("aten.arange.start_step",), (I64, F32), kind="creation", backward=False, samples=3),
    Claim("to", ("aten._to_copy.default",), (F32, BF16, I64, B8), backward=False),
    Claim("clone", ("aten.clone.default",), NUMERIC),
    # layout: pure index arithmetic inside a kernel
    Claim("view", ("aten.view.default",), NUMERIC, kind="layout"),
    Claim("reshape", ("aten.view.default",), (F32,), kind="layout"),
    Claim("permute", ("aten.permute.default",), NUMERIC, kind="layout"),
    Claim("t", ("aten.permute.default",), (F32,), kind="layout"),
    Claim("transpose", ("aten.permute.default",), (F32,), kind="layout"),
    Claim("expand", ("aten.expand.default",), (F32,), kind="layout"),
    Claim("unsqueeze", ("aten.unsqueeze.default",), (F32,), kind="layout"),
    Claim("squeeze", ("aten.squeeze.dims",), (F32,), kind="layout", samples=3),
    Claim("squeeze", ("aten.squeeze.dims",), (F32,), kind="layout", variant="multiple", samples=3),
    Claim("narrow", ("aten.slice.Tensor",), (F32,), kind="layout"),
    Claim("select", ("aten.select.int",), (F32,), kind="layout"),
    Claim("split_with_sizes", ("aten.split_with_sizes.default",), (F32,), kind="layout"),
    Claim("split", ("aten.split_with_sizes.default",), (F32,), kind="layout"),
    Claim("unbind", ("aten.slice.Tensor", "aten.squeeze.dims"), (F32,), kind="layout"),
    Claim("flip", ("aten.flip.default",), (F32,), kind="layout"),
    Claim("cat", ("aten.cat.default",), NUMERIC, kind="layout"),
    Claim("nn.functional.pad", ("aten.constant_pad_nd.default",), FLOATS, kind="layout", variant="constant",
          samples=3),
    Claim("gather", ("aten.gather.default",), FLOATS),
    Claim("index_select", ("aten.index_select.default",), FLOATS),
    # reductions
    Claim("sum", ("aten.sum.dim_IntList",), (*NUMERIC, B8), kind="reduction", samples=3),
    Claim("mean", ("aten.mean.dim", "aten.div.Scalar"), FLOATS, kind="reduction", samples=3),
    Claim("amax", ("aten.amax.default",), NUMERIC, kind="reduction", samples=3),
    Claim("amin", ("aten.amin.default",), NUMERIC, kind="reduction", samples=3),
    Claim("prod", ("aten.prod.dim_int",), (F32,), kind="reduction", backward=False, samples=3),
    Claim("any", ("aten.any.dim",), (B8,), kind="reduction", backward=False, samples=3),
    Claim("all", ("aten.any.dim", "aten.any.dims", "aten.logical_not.default"), (B8,), kind="reduction",
          backward=False, samples=3),
    Claim("scatter_add", ("aten.scatter_add.default",), (F32, I64), kind="reduction", backward=False),
    Claim("topk", ("aten.topk.default",), FLOATS, kind="reduction", samples=3),
    # composites our decompositions split into the claims above (plus the ATen ops they introduce)
    Claim("var", ("aten.sum.dim_IntList",), FLOATS, kind="composite", samples=3),
    Claim("softmax", ("aten.amax.default", "aten.exp.default"), FLOATS, kind="composite"),
    Claim("log_softmax", ("aten.amax.default", "aten.log.default", "aten.alias.default"), FLOATS,
          kind="composite"),
    Claim("nn.functional.layer_norm", ("aten.mean.dim", "aten.rsqrt.default"), FLOATS, kind="composite"),
    Claim("nn.functional.rms_norm", ("aten.mean.dim", "aten.rsqrt.default", "aten.mul.Scalar"), FLOATS,
          kind="composite"),
    Claim("nn.functional.gelu", ("aten.erf.default",), FLOATS, kind="composite"),
    Claim("nn.functional.silu", ("aten.sigmoid.default",), FLOATS, kind="composite"),
    Claim("nn.functional.cross_entropy", ("aten.gather.default", "aten.scalar_tensor.default", "aten.full.default",
                                          "aten.ne.Scalar"), FLOATS, kind="composite", samples=3),
    Claim("nn.functional.hardtanh", ("aten.clamp.default",), FLOATS, kind="composite"),
    # the lookup stays ATen; its backward's index-range mask is fused
    Claim("nn.functional.embedding", ("aten.ge.Scalar", "aten.lt.Scalar"), (F32,), kind="composite"),
    Claim("nn.functional.mse_loss", ("aten.mean.default", "aten.pow.Tensor_Scalar"), FLOATS, kind="composite"),
]

_DTYPE = {F32: torch.float32, BF16: torch.bfloat16, I64: torch.int64, B8: torch.bool}


@functools.cache
def fusible() -> dict[object, frozenset[torch.dtype]]:
    """ATen overload -> the dtypes some claim tests it with (the partitioner's fusible set)."""
    out: dict[object, set[torch.dtype]] = {}
    for c in CLAIMS:
        # a composite's test also runs the integer/boolean index and mask ops its decomposition makes; a
        # layout op only rewrites indices (it never computes on values), so its dtype is immaterial
        if c.kind == "composite":
            dts = {*c.dtypes, I64, B8}
        elif c.kind == "layout":
            dts = {F32, BF16, I64, B8}
        else:
            dts = set(c.dtypes)
        for name in c.aten:
            op = _resolve(name)
            out.setdefault(op, set()).update(_DTYPE[d] for d in dts)
    return {k: frozenset(v) for k, v in out.items()}


def _resolve(name: str):
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def node_dtype(metas_in: list[torch.Tensor], meta_out: torch.Tensor) -> torch.dtype:
    """The dtype a claim's test exercises for a node (the OpInfo sample dtype): its first floating-point
    input, else its first non-bool input (a ``where`` on integers), else its first input, else its output."""
    for m in metas_in:
        if m.dtype.is_floating_point:
            return m.dtype
    for m in metas_in:
        if m.dtype != torch.bool:
            return m.dtype
    return metas_in[0].dtype if metas_in else meta_out.dtype
