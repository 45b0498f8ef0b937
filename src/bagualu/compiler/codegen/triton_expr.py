"""Triton expressions for the GPU code generator: type names, literals, index expressions and the micro-ops.

``micro_op`` spells one compute micro-op of the fusion IR over already-named operands (scalars or blocks:
Triton broadcasts between them); the kernel writer (``triton_src``) handles loads, local buffers, masks
and partial sums. Functions the language lacks, or whose Triton form is less accurate than ATen's
(``expm1``, ``log1p``, ``tanh`` near zero; ``round`` half to even; the interpreter's fp32 -> bf16
conversion, which truncates where the GPU rounds to nearest even), are ``@triton.jit`` helpers in
``PRELUDE``, written with core operations only so that Triton's CPU interpreter (``TRITON_INTERPRET=1``)
runs exactly the code the GPU compiles. ``pow``, ``atan2`` and ``fmod`` call ``libdevice`` on the GPU; the
interpreter has no ``libdevice``, so there ``pow`` uses an ``exp2``/``log2`` helper and the other two are
unsupported (their regions stay ATen, with that reason).
"""

from __future__ import annotations

import math

from bagualu.compiler.index import Expr, FloorDiv, Indirect, Mod, Var
from bagualu.compiler.ir import Value

# compute dtype -> Triton type; storage dtype -> Triton type of the pointer's elements
TT = {"f32": "tl.float32", "f64": "tl.float64", "i64": "tl.int64", "i32": "tl.int32", "b8": "tl.int1"}
STT = {"f32": "tl.float32", "bf16": "tl.bfloat16", "f16": "tl.float16", "f64": "tl.float64", "i64": "tl.int64",
       "i32": "tl.int32", "b8": "tl.int1", "i8": "tl.int8", "u8": "tl.uint8"}
INTERPRETER_UNSUPPORTED = {"atan2", "fmod"}


class Unsupported(Exception):
    """A kernel this code generator cannot express; its region runs on ATen with this reason."""


def literal(value, dtype: str) -> str:
    """A typed scalar: ``tl.full([], v, type)`` (a bare Python float would be fp32, an int int32)."""
    if dtype == "b8":
        return f"tl.full([], {1 if value else 0}, tl.int1)"
    if dtype in ("i64", "i32"):
        return f"tl.full([], {int(value)}, {TT[dtype]})"
    v = float(value)
    if math.isnan(v):
        s = 'float("nan")'
    elif math.isinf(v):
        s = 'float("inf")' if v > 0 else '-float("inf")'
    else:
        s = repr(v)
    return f"tl.full([], {s}, {TT[dtype]})"


def t_expr(e: Expr, names: dict[int, str], vname=lambda v: v.name) -> str:
    """An index expression over loop variables (scalars or int64 blocks) and indirect index values."""
    parts = []
    for a, c in e.terms:
        if isinstance(a, Var):
            s = vname(a)
        elif isinstance(a, Indirect):
            s = names[a.value_id]
        elif isinstance(a, (FloorDiv, Mod)):
            inner = t_expr(a.expr, names, vname)
            lo, _ = a.expr.bounds()
            fn = "_pf_floordiv" if isinstance(a, FloorDiv) else "_pf_mod"
            op = "//" if isinstance(a, FloorDiv) else "%"
            # // and % on a negative operand differ between Triton (C) and its interpreter (NumPy)
            s = f"(({inner}) {op} {a.divisor})" if lo >= 0 else f"{fn}({inner}, {a.divisor})"
        else:
            raise TypeError(a)
        parts.append(s if c == 1 else f"{c}*{s}")
    if e.const or not parts:
        parts.append(f"{e.const}")
    return "(" + " + ".join(parts) + ")"


def to_bf16(x: str, interpret: bool) -> str:
    """fp32 -> bf16 rounded to nearest even, as the GPU converts (the interpreter would truncate)."""
    return f"_pf_to_bf16({x})" if interpret else f"({x}).to(tl.bfloat16)"


def micro_op(v: Value, n: list[str], interpret: bool) -> str:
    """Triton for the micro-op ``v`` whose operands are the Triton expressions ``n``."""
    op, d = v.op, v.dtype
    fl = d in ("f32", "f64")
    if op == "cast":
        to = v.attrs["to"]
        if to == "bf16":
            return f"{to_bf16(n[0], interpret)}.to(tl.float32)"
        if to == "f16":
            return f"({n[0]}).to(tl.float16).to(tl.float32)"
        if to in ("i8", "u8"):
            return f"({n[0]}).to({STT[to]}).to(tl.int32)"
        if d == "b8":
            return f"(({n[0]}) != 0)"
        return f"({n[0]}).to({TT[d]})"
    if op in INTERPRETER_UNSUPPORTED and interpret:
        raise Unsupported(f"micro-op {op!r} needs libdevice, which Triton's interpreter lacks")
    simple = {
        "neg": "(-{0})", "abs": "tl.abs({0})", "exp": "tl.exp({0})", "expm1": "_pf_expm1({0})",
        "log": "tl.log({0})", "log1p": "_pf_log1p({0})", "log2": "tl.log2({0})", "sqrt": "tl.sqrt_rn({0})",
        "rsqrt": "(1.0 / tl.sqrt_rn({0}))", "reciprocal": "(1.0 / ({0}))", "sigmoid": "_pf_sigmoid({0})",
        "tanh": "_pf_tanh({0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})", "erf": "tl.erf({0})",
        "floor": "tl.floor({0})", "ceil": "tl.ceil({0})", "trunc": "_pf_trunc({0})", "round": "_pf_round({0})",
        "not": "(({0}) == 0)", "isnan": "(({0}) != ({0}))", "square": "(({0}) * ({0}))",
        "relu": "tl.where(({0}) < 0, 0, {0})",
        "add": "(({0}) + ({1}))", "sub": "(({0}) - ({1}))", "mul": "(({0}) * ({1}))", "div": "(({0}) / ({1}))",
        "eq": "(({0}) == ({1}))", "ne": "(({0}) != ({1}))", "lt": "(({0}) < ({1}))", "le": "(({0}) <= ({1}))",
        "gt": "(({0}) > ({1}))", "ge": "(({0}) >= ({1}))", "and": "((({0}) != 0) & (({1}) != 0))",
        "or": "((({0}) != 0) | (({1}) != 0))", "xor": "((({0}) != 0) ^ (({1}) != 0))",
        "where": "tl.where({0}, {1}, {2})",
        "pow": "_pf_pow({0}, {1})" if interpret else "libdevice.pow({0}, {1})",
        "atan2": "libdevice.atan2({0}, {1})", "fmod": "libdevice.fmod({0}, {1})",
    }
    if op == "sign":
        if fl:
            sgn = f"(({n[0]}) > 0).to({TT[d]}) - (({n[0]}) < 0).to({TT[d]})"
            return f"tl.where(({n[0]}) != ({n[0]}), {n[0]}, {sgn})"
        return f"((({n[0]}) > 0).to({TT[d]}) - (({n[0]}) < 0).to({TT[d]}))"
    if op in ("max", "min"):
        cmp = ">" if op == "max" else "<"
        if fl:  # NaN propagates from either side, as ATen's maximum/minimum
            return f"tl.where((({n[0]}) {cmp} ({n[1]})) | (({n[0]}) != ({n[0]})), {n[0]}, {n[1]})"
        return f"tl.where(({n[0]}) {cmp} ({n[1]}), {n[0]}, {n[1]})"
    if op in simple:
        return simple[op].format(*n)
    raise Unsupported(f"Triton code generator: micro-op {op!r}")


PRELUDE = '''
@triton.jit
def _pf_to_bf16(x):
    b = x.to(tl.float32).to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where(x != x, b | 0x400000, r)
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _pf_floordiv(a, d):
    return tl.where(a < 0, -((d - 1 - a) // d), a // d)


@triton.jit
def _pf_mod(a, d):
    return a - _pf_floordiv(a, d) * d


@triton.jit
def _pf_sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _pf_expm1(x):
    # |x| < 0.5: Taylor to x^9 (truncation < 3e-10 relative); else exp(x) - 1 loses nothing
    p = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720 + x * (
        1.0 / 5040 + x * (1.0 / 40320 + x * (1.0 / 362880)))))))))
    return tl.where(tl.abs(x) < 0.5, p, tl.exp(x) - 1.0)


@triton.jit
def _pf_log1p(x):
    # log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u (Goldberg)
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0, x, tl.log(u) * (x / tl.where(d == 0, 1.0, d)))


@triton.jit
def _pf_tanh(x):
    e = _pf_expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x != x, x, tl.where(x < 0, -t, t))


@triton.jit
def _pf_trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))


@triton.jit
def _pf_round(x):
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _pf_pow(a, b):
    r = tl.exp2(b * tl.log2(tl.abs(a)))
    fb = tl.floor(b)
    half = b * 0.5
    odd = tl.where(fb == b, tl.where(tl.floor(half) != half, 1, 0), 0)
    r = tl.where(a < 0, tl.where(fb == b, tl.where(odd == 1, -r, r), float("nan")), r)
    return tl.where(b == 0, 1.0, r)
'''
