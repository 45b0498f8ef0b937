"""PowerFusion's index algebra: the simplifications that keep stride-1 loops affine, checked by brute force."""

from __future__ import annotations

import itertools

import pytest

from bagualu.compiler import index as ix
from bagualu.compiler.index import Var


def _eval(e: ix.Expr, env: dict) -> int:
    out = e.const
    for a, c in e.terms:
        if isinstance(a, Var):
            v = env[a]
        elif isinstance(a, ix.FloorDiv):
            v = _eval(a.expr, env) // a.divisor
        elif isinstance(a, ix.Mod):
            v = _eval(a.expr, env) % a.divisor
        else:
            raise TypeError(a)
        out += c * v
    return out


def _check(e: ix.Expr, ref, vars_):
    for vals in itertools.product(*(range(v.size) for v in vars_)):
        env = dict(zip(vars_, vals))
        assert _eval(e, env) == ref(*vals), (e, vals)


def test_reshape_round_trip_is_identity():
    i, s = Var("i", 6), Var("s", 5)
    flat = ix.var(i) * 5 + ix.var(s)
    back = ix.delinearize(flat, (6, 5))
    assert back == (ix.var(i), ix.var(s))


def test_merge_split_of_dims_stays_affine():
    b, s, h, d = Var("b", 2), Var("s", 3), Var("h", 4), Var("d", 8)
    flat = ix.linearize((ix.var(b), ix.var(s), ix.var(h), ix.var(d)), ix.contiguous_strides((2, 3, 4, 8)))
    i2 = ix.delinearize(flat, (6, 32))  # view [B*S, H*Dh]
    assert i2[0] == ix.var(b) * 3 + ix.var(s) and i2[1] == ix.var(h) * 8 + ix.var(d)
    assert all(e.linear_in(d) for e in i2)


def test_gcd_rule_folds_divisions():
    o0, o1, s0 = Var("o0", 32), Var("o1", 32), Var("s0", 4)
    e = ix.floordiv(ix.var(o0) * 128 + ix.var(o1) + ix.var(s0) * 32, 2048)
    assert e == ix.floordiv(ix.var(o0), 16)
    _check(e, lambda a, b, c: (a * 128 + b + c * 32) // 2048, [o0, o1, s0])
    m = ix.mod(ix.var(o0) * 128 + ix.var(o1) + ix.var(s0) * 32, 2048)
    _check(m, lambda a, b, c: (a * 128 + b + c * 32) % 2048, [o0, o1, s0])


@pytest.mark.parametrize("d", [1, 2, 3, 4, 7, 12])
def test_div_mod_are_exact(d):
    x, y = Var("x", 5), Var("y", 7)
    e = ix.var(x) * 6 + ix.var(y) * 2 + 3
    _check(ix.floordiv(e, d), lambda a, b: (6 * a + 2 * b + 3) // d, [x, y])
    _check(ix.mod(e, d), lambda a, b: (6 * a + 2 * b + 3) % d, [x, y])
    neg = ix.var(x) - 2  # floor semantics below zero, as Python and the code generators implement them
    _check(ix.floordiv(neg, d), lambda a: (a - 2) // d, [x])
    _check(ix.mod(neg, d), lambda a: (a - 2) % d, [x])


def test_bounds_and_substitution():
    x = Var("x", 10)
    e = ix.var(x) * 3 - 4
    assert e.bounds() == (-4, 23)
    y = Var("y", 5)
    assert e.subs({x: ix.var(y) + 5}).bounds() == (11, 23)


def test_bad_divisor_names_the_value():
    with pytest.raises(ValueError, match="by 0"):
        ix.floordiv(ix.const(3), 0)
