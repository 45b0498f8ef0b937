"""C expressions for the CPU code generator: type names, literals, index expressions and the micro-ops.

``micro_op`` spells one compute micro-op of the fusion IR over already-named operands; the kernel writer
(``cpp``) handles what depends on the kernel (loads, local buffers, partial sums, per-row reciprocals).
"""

from __future__ import annotations

import math

from bagualu.compiler.index import Expr, FloorDiv, Indirect, Mod, Var
from bagualu.compiler.ir import Value

CT = {"f32": "float", "f64": "double", "i64": "int64_t", "i32": "int32_t", "b8": "bool"}
ST = {"f32": "float", "bf16": "uint16_t", "f16": "uint16_t", "f64": "double", "i64": "int64_t", "i32": "int32_t",
      "b8": "uint8_t", "i8": "int8_t", "u8": "uint8_t"}
IDENT = {("sum", "f"): "0", ("prod", "f"): "1", ("max", "f"): "-INFINITY", ("min", "f"): "INFINITY",
         ("sum", "i"): "0", ("prod", "i"): "1", ("max", "i"): "INT64_MIN", ("min", "i"): "INT64_MAX",
         ("any", "b"): "0", ("all", "b"): "1"}
OMP_RED = {"sum": "+", "prod": "*", "max": "max", "min": "min", "any": "|", "all": "&"}
PREFETCH_CHUNK = 512  # elements of the innermost loop per prefetch burst
# An innermost loop of at most this many trips (a router's k = 6 weights) runs without `omp simd`: GCC
# unrolls and SLP-vectorises it itself, where simdlen(16) made a masked vector body plus a scalar tail of it
# (measured 2-3% of the MoE router kernel).
SHORT_LOOP = 8


def dtype_class(dtype: str) -> str:
    return "f" if dtype in ("f32", "f64") else ("b" if dtype == "b8" else "i")


def literal(value, dtype: str) -> str:
    if dtype == "b8":
        return "true" if value else "false"
    if dtype in ("i64", "i32"):
        return f"((int64_t){int(value)}LL)" if dtype == "i64" else f"((int32_t){int(value)})"
    v = float(value)
    suffix = "f" if dtype == "f32" else ""
    if math.isnan(v):
        return "NAN" if dtype == "f32" else "((double)NAN)"
    if math.isinf(v):
        return ("INFINITY" if v > 0 else "(-INFINITY)") if dtype == "f32" else \
            ("((double)INFINITY)" if v > 0 else "((double)-INFINITY)")
    return f"({v.hex()}{suffix})"


def c_expr(e: Expr, names: dict[int, str]) -> str:
    parts = []
    for a, c in e.terms:
        if isinstance(a, Var):
            s = a.name
        elif isinstance(a, Indirect):
            s = names[a.value_id]
        elif isinstance(a, (FloorDiv, Mod)):
            inner = c_expr(a.expr, names)
            lo, _ = a.expr.bounds()
            if isinstance(a, FloorDiv):
                s = f"(({inner}) / {a.divisor})" if lo >= 0 else f"pf_floordiv({inner}, {a.divisor})"
            else:
                s = f"(({inner}) % {a.divisor})" if lo >= 0 else f"pf_mod({inner}, {a.divisor})"
        else:
            raise TypeError(a)
        parts.append(s if c == 1 else f"{c}*{s}")
    if e.const or not parts:
        parts.append(f"{e.const}")
    return "(" + " + ".join(parts) + ")"


def micro_op(v: Value, n: list[str]) -> str:
    """C for the micro-op ``v`` whose operands are the C expressions ``n``."""
    op, d = v.op, v.dtype
    f32 = d == "f32"
    if op == "cast":
        to = v.attrs["to"]
        if to == "bf16":
            return f"pf_round_bf16({n[0]})"
        if to == "i8":
            return f"((int32_t)(int8_t)({n[0]}))"
        if to == "u8":
            return f"((int32_t)(uint8_t)({n[0]}))"
        if d == "b8":
            return f"({n[0]} != 0)"
        return f"(({CT[d]})({n[0]}))"
    fsuf = "f" if f32 else ""
    unary = {
        "neg": f"(-{n[0]})" if op == "neg" else "",
        "abs": (f"__builtin_fabs{fsuf}({n[0]})" if dtype_class(d) == "f" else f"({n[0]} < 0 ? -{n[0]} : {n[0]})")
        if op == "abs" else "",
        "exp": f"pf_exp({n[0]})" if f32 else f"exp({n[0]})",
        "expm1": f"expm1{fsuf}({n[0]})", "log": f"log{fsuf}({n[0]})", "log1p": f"log1p{fsuf}({n[0]})",
        "log2": f"log2{fsuf}({n[0]})", "sqrt": f"__builtin_sqrt{fsuf}({n[0]})",
        "rsqrt": f"(1.0{fsuf} / __builtin_sqrt{fsuf}({n[0]}))", "reciprocal": f"(1.0{fsuf} / {n[0]})",
        "sigmoid": f"pf_sigmoid({n[0]})" if f32 else f"pf_sigmoidd({n[0]})",
        "tanh": f"tanh{fsuf}({n[0]})", "sin": f"sin{fsuf}({n[0]})", "cos": f"cos{fsuf}({n[0]})",
        "erf": f"erf{fsuf}({n[0]})", "floor": f"__builtin_floor{fsuf}({n[0]})",
        "ceil": f"__builtin_ceil{fsuf}({n[0]})", "trunc": f"__builtin_trunc{fsuf}({n[0]})",
        "round": f"__builtin_nearbyint{fsuf}({n[0]})",
        "sign": (f"pf_sign{'f' if f32 else 'd'}({n[0]})" if dtype_class(d) == "f"
                 else f"(({CT[d]})(({n[0]} > 0) - ({n[0]} < 0)))") if op == "sign" else "",
        "not": f"(!{n[0]})", "isnan": f"({n[0]} != {n[0]})",
        "relu": f"({n[0]} < 0 ? ({CT[d]})0 : {n[0]})", "square": f"({n[0]} * {n[0]})",
    }
    if op in unary:
        return unary[op]
    if op in ("add", "sub", "mul", "div"):
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
        return f"({n[0]} {sym} {n[1]})"
    if op in ("max", "min"):
        if dtype_class(d) == "f":
            return f"pf_{op}{'f' if f32 else 'd'}({n[0]}, {n[1]})"
        return f"({n[0]} {'>' if op == 'max' else '<'} {n[1]} ? {n[0]} : {n[1]})"
    if op == "pow":
        return f"pow{fsuf}({n[0]}, {n[1]})"
    if op == "atan2":
        return f"atan2{fsuf}({n[0]}, {n[1]})"
    if op in ("eq", "ne", "lt", "le", "gt", "ge"):
        sym = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[op]
        return f"({n[0]} {sym} {n[1]})"
    if op in ("and", "or", "xor"):
        sym = {"and": "&&", "or": "||", "xor": "!="}[op]
        return f"({n[0]} {sym} {n[1]})"
    if op == "where":
        return f"({n[0]} ? {n[1]} : {n[2]})"
    raise NotImplementedError(f"C code generator: micro-op {op!r}")
