"""Integer index expressions of the fusion IR: linear forms over loop variables, floor-division and modulo.

Every load and store of a fused kernel addresses memory with one of these. Views, permutes, broadcasts,
slices and reshapes compose into them during lowering, so a chain of layout operators costs no memory
traffic: it becomes arithmetic on the loop variables. The simplifier knows each atom's range, which is
what removes the ``(i*S + s) // S -> i`` and ``(i*S + s) % S -> s`` patterns a reshape round trip leaves;
without ranges (as in plain ``sympy``) those stay, and a stride-1 inner loop would look like a gather.

An expression is ``const + sum(coeff * atom)`` with atoms ``Var`` (a loop variable with its extent),
``FloorDiv``, ``Mod`` and ``Indirect`` (an integer IR value used as an index: gathers). Expressions are
immutable and hashable so they key memo tables; they are built only through the functions here, which
keep them in normal form (terms sorted, zero coefficients dropped, nested div/mod folded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Var:
    """A loop variable taking the values ``0 .. size-1``."""

    name: str
    size: int

    def bounds(self) -> tuple[int, int]:
        return 0, self.size - 1

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FloorDiv:
    expr: "Expr"
    divisor: int

    def bounds(self) -> tuple[int, int]:
        lo, hi = self.expr.bounds()
        return lo // self.divisor, hi // self.divisor

    def __repr__(self) -> str:
        return f"({self.expr!r})//{self.divisor}"


@dataclass(frozen=True)
class Mod:
    expr: "Expr"
    divisor: int

    def bounds(self) -> tuple[int, int]:
        lo, hi = self.expr.bounds()
        if lo >= 0 and hi < self.divisor:
            return lo, hi
        return 0, self.divisor - 1

    def __repr__(self) -> str:
        return f"({self.expr!r})%{self.divisor}"


@dataclass(frozen=True)
class Indirect:
    """An integer IR value (by id) used as an index; ``size`` is the extent it must lie in (checked)."""

    value_id: int
    size: int

    def bounds(self) -> tuple[int, int]:
        return 0, self.size - 1

    def __repr__(self) -> str:
        return f"v{self.value_id}"


Atom = Union[Var, FloorDiv, Mod, Indirect]


def _atom_key(a: Atom) -> tuple:
    return (type(a).__name__, repr(a))


@dataclass(frozen=True)
class Expr:
    terms: tuple[tuple[Atom, int], ...]  # sorted by atom key, coefficients non-zero
    const: int = 0

    # ---- queries -------------------------------------------------------------------------------
    def bounds(self) -> tuple[int, int]:
        lo = hi = self.const
        for atom, c in self.terms:
            a_lo, a_hi = atom.bounds()
            if c >= 0:
                lo, hi = lo + c * a_lo, hi + c * a_hi
            else:
                lo, hi = lo + c * a_hi, hi + c * a_lo
        return lo, hi

    def coeff(self, atom: Atom) -> int:
        for a, c in self.terms:
            if a == atom:
                return c
        return 0

    def atoms(self) -> set[Atom]:
        """Every atom, including those nested inside div/mod atoms."""
        out: set[Atom] = set()
        for a, _ in self.terms:
            out.add(a)
            if isinstance(a, (FloorDiv, Mod)):
                out |= a.expr.atoms()
        return out

    def vars(self) -> set[Var]:
        return {a for a in self.atoms() if isinstance(a, Var)}

    def indirects(self) -> set[Indirect]:
        return {a for a in self.atoms() if isinstance(a, Indirect)}

    def is_const(self) -> bool:
        return not self.terms

    def linear_in(self, v: Var) -> bool:
        """True when ``v`` appears only as a plain term (not inside a div/mod): stride-constant in ``v``."""
        return all(v not in a.expr.atoms() for a, _ in self.terms if isinstance(a, (FloorDiv, Mod)))

    # ---- arithmetic (normal form maintained) ---------------------------------------------------
    def __add__(self, other: "Expr | int") -> "Expr":
        if isinstance(other, int):
            return Expr(self.terms, self.const + other)
        acc: dict[Atom, int] = dict(self.terms)
        for a, c in other.terms:
            acc[a] = acc.get(a, 0) + c
        return _normal(acc, self.const + other.const)

    __radd__ = __add__

    def __mul__(self, k: int) -> "Expr":
        if not isinstance(k, int):
            raise TypeError(f"index expressions multiply by int constants only, got {type(k).__name__}")
        if k == 0:
            return Expr((), 0)
        return Expr(tuple((a, c * k) for a, c in self.terms), self.const * k)

    __rmul__ = __mul__

    def __neg__(self) -> "Expr":
        return self * -1

    def __sub__(self, other: "Expr | int") -> "Expr":
        return self + (-other if isinstance(other, int) else other * -1)

    def subs(self, mapping: dict[Atom, "Expr"]) -> "Expr":
        """Replace atoms (Vars or Indirects) by expressions, re-simplifying nested div/mod."""
        out = const(self.const)
        for a, c in self.terms:
            if a in mapping:
                out = out + mapping[a] * c
            elif isinstance(a, FloorDiv):
                out = out + floordiv(a.expr.subs(mapping), a.divisor) * c
            elif isinstance(a, Mod):
                out = out + mod(a.expr.subs(mapping), a.divisor) * c
            else:
                out = out + Expr(((a, c),), 0)
        return out

    def __repr__(self) -> str:
        parts = [f"{c}*{a!r}" if c != 1 else repr(a) for a, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts)


def _normal(acc: dict[Atom, int], k: int) -> Expr:
    acc = {a: c for a, c in acc.items() if c != 0}
    # c*d*(e//d) + c*(e%d) == c*e: the trace a reshape round trip leaves behind
    for a in [a for a in acc if isinstance(a, FloorDiv)]:
        m = Mod(a.expr, a.divisor)
        if a in acc and m in acc and acc[a] == acc[m] * a.divisor:
            c = acc.pop(m)
            acc.pop(a)
            rest = a.expr * c
            for b, cb in rest.terms:
                acc[b] = acc.get(b, 0) + cb
            k += rest.const
            return _normal(acc, k)
    return Expr(tuple(sorted(acc.items(), key=lambda t: _atom_key(t[0]))), k)


def const(k: int) -> Expr:
    return Expr((), int(k))


def var(v: Var) -> Expr:
    return Expr(((v, 1),), 0)


def atom(a: Atom) -> Expr:
    return Expr(((a, 1),), 0)


def floordiv(e: Expr, d: int) -> Expr:
    """``e // d`` (floor) for a positive int ``d``; exact parts are pulled out, range-determined parts folded."""
    if d <= 0:
        raise ValueError(f"floordiv by {d}: index divisors must be positive")
    if d == 1:
        return e
    exact = const(0)
    rest: dict[Atom, int] = {}
    for a, c in e.terms:
        if c % d == 0:
            exact = exact + atom(a) * (c // d)
        else:
            rest[a] = c
    q, r = divmod(e.const, d)
    exact = exact + q
    rest_e = _normal(rest, r)
    lo, hi = rest_e.bounds()
    if lo // d == hi // d:
        return exact + lo // d
    if len(rest_e.terms) == 1 and rest_e.const == 0 and isinstance(rest_e.terms[0][0], FloorDiv) \
            and rest_e.terms[0][1] == 1:
        inner = rest_e.terms[0][0]
        return exact + floordiv(inner.expr, inner.divisor * d)
    g, big, small = _split_by_factor(rest_e, d)
    if g > 1:  # (g*A + r) // d == A // (d/g) when 0 <= r < g
        return exact + floordiv(big, d // g)
    return exact + atom(FloorDiv(rest_e, d))


def _split_by_factor(e: Expr, d: int) -> tuple[int, Expr, Expr]:
    """The largest g | d with e = g*big + small and 0 <= small < g (g = 1 when none)."""
    import math

    best = (1, e, const(0))
    for _, c in e.terms:
        g = math.gcd(abs(c), d)
        if g <= best[0]:
            continue
        big = {a: cc // g for a, cc in e.terms if cc % g == 0}
        small = {a: cc for a, cc in e.terms if cc % g != 0}
        q, r = divmod(e.const, g)
        small_e = _normal(small, r)
        lo, hi = small_e.bounds()
        if lo >= 0 and hi < g:
            best = (g, _normal(big, q), small_e)
    return best


def mod(e: Expr, d: int) -> Expr:
    """``e % d`` (Python semantics, result in ``0..d-1``) for a positive int ``d``."""
    if d <= 0:
        raise ValueError(f"mod by {d}: index divisors must be positive")
    if d == 1:
        return const(0)
    rest = {a: c for a, c in e.terms if c % d != 0}
    rest_e = _normal(rest, e.const % d)
    lo, hi = rest_e.bounds()
    if lo >= 0 and hi < d:
        return rest_e
    if lo // d == hi // d:  # the whole range lies in one period: subtract it
        return rest_e - (lo // d) * d
    if len(rest_e.terms) == 1 and rest_e.const == 0 and rest_e.terms[0][1] == 1 \
            and isinstance(rest_e.terms[0][0], Mod) and rest_e.terms[0][0].divisor % d == 0:
        return mod(rest_e.terms[0][0].expr, d)
    g, big, small = _split_by_factor(rest_e, d)
    if g > 1:  # (g*A + r) % d == g*(A % (d/g)) + r when 0 <= r < g
        return mod(big, d // g) * g + small
    return atom(Mod(rest_e, d))


def linearize(index: tuple[Expr, ...], strides: tuple[int, ...], offset: int = 0) -> Expr:
    """Element offset of a multi-dimensional index in a strided buffer."""
    out = const(offset)
    for i, s in zip(index, strides):
        out = out + i * int(s)
    return out


def delinearize(flat: Expr, shape: tuple[int, ...]) -> tuple[Expr, ...]:
    """The row-major multi-index of flat position ``flat`` in ``shape``."""
    out = []
    stride = 1
    for size in reversed(shape):
        out.append(mod(floordiv(flat, stride), size) if size != 1 else const(0))
        stride *= size
    return tuple(reversed(out))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, s = [], 1
    for size in reversed(shape):
        strides.append(s)
        s *= max(int(size), 1)
    return tuple(reversed(strides))
