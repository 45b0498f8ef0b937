"""Reference evaluator of the fusion IR with PyTorch tensor ops: the IR's executable specification.

Every value becomes a tensor over a grid with one axis per loop variable (size 1 where the value does
not depend on it), so a kernel runs as a handful of whole-tensor ops. It is slow and allocates the full
row x space grid, but it is small enough to be obviously right: tests check the lowering with it
(lowered IR == eager), and the code generators against it. Unbounded indices of unselected ``where``
branches are clamped into the buffer, exactly as the code generators must make them safe.
"""

from __future__ import annotations

import torch

from bagualu.compiler.index import Expr, FloorDiv, Indirect, Mod, Var
from bagualu.compiler.ir import Kernel, Value
from bagualu.compiler.lower import IR_TO_TORCH

_TORCH = {"f32": torch.float32, "f64": torch.float64, "i64": torch.int64, "i32": torch.int32, "b8": torch.bool}


class _Eval:
    def __init__(self, k: Kernel, inputs: list[torch.Tensor]):
        self.k = k
        self.inputs = inputs
        self.axes: list[Var] = list(k.outer)
        for s in k.spaces:
            self.axes += [v for v in s.vars if v not in self.axes]
        self.rank = len(self.axes)
        self.vals: dict[int, torch.Tensor] = {}
        self.acc: dict[int, torch.Tensor] = {}
        self.flat_inputs = []
        for t in inputs:
            span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
            self.flat_inputs.append(torch.as_strided(t, (span,), (1,), t.storage_offset()))

    def axis(self, v: Var) -> torch.Tensor:
        shape = [1] * self.rank
        a = self.axes.index(v)
        shape[a] = v.size
        return torch.arange(v.size).view(shape)

    def expr(self, e: Expr) -> torch.Tensor:
        out = torch.full([1] * self.rank, e.const, dtype=torch.int64)
        for atom, c in e.terms:
            if isinstance(atom, Var):
                t = self.axis(atom)
            elif isinstance(atom, FloorDiv):
                t = torch.div(self.expr(atom.expr), atom.divisor, rounding_mode="floor")
            elif isinstance(atom, Mod):
                t = torch.remainder(self.expr(atom.expr), atom.divisor)
            elif isinstance(atom, Indirect):
                t = self.value(self.k.values[atom.value_id]).to(torch.int64)
                if bool(((t < 0) | (t >= atom.size)).any()):
                    raise IndexError(f"index out of range [0, {atom.size}) in a gather/scatter")
            else:
                raise TypeError(atom)
            out = out + t * c
        return out

    def full(self, t: torch.Tensor, vars_) -> torch.Tensor:
        shape = list(t.shape)
        for v in vars_:
            shape[self.axes.index(v)] = v.size
        return t.expand(shape)

    def value(self, v: Value) -> torch.Tensor:
        hit = self.vals.get(v.id)
        if hit is not None:
            return hit
        out = self._compute(v)
        if out.dim() < self.rank:
            out = out.view([1] * (self.rank - out.dim()) + list(out.shape))
        self.vals[v.id] = out
        return out

    def _compute(self, v: Value) -> torch.Tensor:
        op, a = v.op, [self.value(x) for x in v.args] if v.op not in ("reduce", "topk", "local_load") else []
        dt = _TORCH[v.dtype]
        if op == "const":
            return torch.tensor(v.attrs["value"], dtype=dt)
        if op == "index":
            return self.expr(v.attrs["expr"])
        if op == "load":
            flat = self.flat_inputs[v.attrs["buf"]]
            e = self.expr(v.attrs["expr"]).clamp(0, max(flat.numel() - 1, 0))
            return flat[e].to(dt)
        if op == "cast":
            to = v.attrs["to"]
            x = a[0]
            if to in ("bf16", "f16", "i8", "u8"):
                return x.to(IR_TO_TORCH[to]).to(dt)
            return x.to(dt)
        if op == "reduce":
            body = self.value(v.args[0])
            sp = v.attrs["space"]
            body = self.full(body, sp.vars)
            dims = [self.axes.index(x) for x in sp.vars]
            return _reduce(v.attrs["kind"], body, dims)
        if op == "topk":
            body = self.full(self.value(v.args[0]), v.attrs["space"].vars)
            ax = self.axes.index(v.attrs["space"].vars[0])
            vals, idxs = torch.topk(body, v.attrs["k"], dim=ax, largest=v.attrs["largest"], sorted=True)
            self.vals[("tv", v.id)] = (vals, idxs, ax)  # type: ignore[index]
            return vals
        if op == "local_load":
            t = v.args[0]
            self.value(t)
            vals, idxs, ax = self.vals[("tv", t.id)]  # type: ignore[index]
            src = vals if v.attrs["local"] is t.attrs["vals"] else idxs
            j = self.expr(v.attrs["expr"])
            src = src.movedim(ax, -1)
            j = j.movedim(ax, -1)
            shape = torch.broadcast_shapes(src.shape[:-1], j.shape[:-1])
            src = src.expand(*shape, src.shape[-1])
            j = j.expand(*shape, 1)
            return torch.take_along_dim(src, j, dim=-1).movedim(-1, ax).to(dt)
        if op == "accum":
            acc = self.acc[v.attrs["cr"]]
            return acc[self.expr(v.attrs["expr"])].to(dt)
        return _pointwise(op, a, dt)

    def run(self) -> list[torch.Tensor]:
        k = self.k
        outs = [torch.empty(b.shape, dtype=IR_TO_TORCH[b.dtype]) for b in k.outputs]
        for st in k.stores:
            self._store(outs[st.buf], st.index, self.value(st.value))
        for cr in k.col_reduces:
            body = self.value(cr.value)
            grid_vars = list(k.outer) + (list(cr.space.vars) if cr.space else [])
            body = self.full(body, grid_vars)
            slot = self.expr(cr.index).expand_as(body)
            ident = {"sum": 0, "max": float("-inf"), "min": float("inf"), "prod": 1, "any": 0, "all": 1}[cr.kind]
            acc = torch.full((cr.size,), ident, dtype=body.dtype if body.dtype != torch.bool else torch.int64)
            b = body.reshape(-1).to(acc.dtype)
            red = {"sum": "sum", "max": "amax", "min": "amin", "prod": "prod", "any": "amax", "all": "amin"}[cr.kind]
            acc = acc.scatter_reduce(0, slot.reshape(-1), b, reduce=red, include_self=True)
            self.acc[cr.id] = acc
        for fs in k.final_stores:
            self._store(outs[fs.buf], fs.index, self.value(fs.value))
        return outs

    def _store(self, out: torch.Tensor, e: Expr, val: torch.Tensor) -> None:
        idx = self.expr(e)
        shape = torch.broadcast_shapes(idx.shape, val.shape)
        out.view(-1)[idx.expand(shape).reshape(-1)] = val.expand(shape).reshape(-1).to(out.dtype)


def _reduce(kind: str, body: torch.Tensor, dims: list[int]) -> torch.Tensor:
    if kind == "sum":
        return body.sum(dims, keepdim=True, dtype=body.dtype)
    if kind == "max":
        return body.amax(dims, keepdim=True)
    if kind == "min":
        return body.amin(dims, keepdim=True)
    if kind in ("any", "all"):
        out = body
        for d in dims:
            out = out.any(d, keepdim=True) if kind == "any" else out.all(d, keepdim=True)
        return out
    out = body
    for d in dims:
        out = out.prod(d, keepdim=True)
    return out


def _pointwise(op: str, a: list[torch.Tensor], dt: torch.dtype) -> torch.Tensor:
    x = a[0] if a else None
    table = {
        "neg": lambda: -x, "abs": lambda: x.abs(), "exp": lambda: x.exp(), "expm1": lambda: x.expm1(),
        "log": lambda: x.log(), "log1p": lambda: x.log1p(), "log2": lambda: x.log2(), "sqrt": lambda: x.sqrt(),
        "rsqrt": lambda: x.rsqrt(), "reciprocal": lambda: x.reciprocal(), "sigmoid": lambda: x.sigmoid(),
        "tanh": lambda: x.tanh(), "sin": lambda: x.sin(), "cos": lambda: x.cos(), "erf": lambda: x.erf(),
        "floor": lambda: x.floor(), "ceil": lambda: x.ceil(), "trunc": lambda: x.trunc(),
        "round": lambda: x.round(), "sign": lambda: x.sign(), "not": lambda: ~x, "isnan": lambda: x.isnan(),
        "relu": lambda: x.relu(), "square": lambda: x * x,
        "add": lambda: a[0] + a[1], "sub": lambda: a[0] - a[1], "mul": lambda: a[0] * a[1],
        "div": lambda: a[0] / a[1], "max": lambda: torch.maximum(a[0], a[1]),
        "min": lambda: torch.minimum(a[0], a[1]), "pow": lambda: torch.pow(a[0], a[1]),
        "eq": lambda: a[0] == a[1], "ne": lambda: a[0] != a[1], "lt": lambda: a[0] < a[1],
        "le": lambda: a[0] <= a[1], "gt": lambda: a[0] > a[1], "ge": lambda: a[0] >= a[1],
        "and": lambda: a[0] & a[1], "or": lambda: a[0] | a[1], "xor": lambda: a[0] ^ a[1],
        "atan2": lambda: torch.atan2(a[0], a[1]), "where": lambda: torch.where(a[0], a[1], a[2]),
    }
    fn = table.get(op)
    if fn is None:
        raise NotImplementedError(f"interpreter has no micro-op {op!r}")
    return fn().to(dt)


def run_kernel(k: Kernel, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Evaluate ``k`` on ``inputs`` (matching ``k.inputs`` in dtype and shape); returns new outputs."""
    for b, t in zip(k.inputs, inputs):
        if tuple(t.shape) != b.shape or t.dtype != IR_TO_TORCH[b.dtype]:
            raise ValueError(f"input {b.name}: expected {b.dtype}{list(b.shape)}, got {t.dtype}{list(t.shape)}")
    return _Eval(k, inputs).run()
