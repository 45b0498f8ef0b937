"""The CPU element-wise kernels (``ops.elementwise_cpu``, ``csrc/elementwise_cpu.cpp``) against fp64 math and the
reference (``ops.reference``): ``silu_mul``, ``silu_mul_backward``, ``scale_rows``, ``row_dot``, ``index_add_rows``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bagualu.ops import elementwise_cpu as ew
from bagualu.ops import kernel, reference

pytestmark = pytest.mark.skipif(ew.library() is None, reason="no C++ compiler: the kernels are not built")

F32, BF16 = torch.float32, torch.bfloat16
# fp32: a few ulp (the polynomial exp); bf16: each value rounded once from fp32, so one bf16 step (2^-7) at most
# from the fp64 value rounded (a few fp32 ulp can cross a rounding midpoint), and from the reference, which
# rounds silu(g) to bf16 before the product
TOL = {F32: dict(rtol=1e-5, atol=1e-6), BF16: dict(rtol=2 ** -7, atol=1e-5)}


def rand(*shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def silu64(g):
    g = g.double()
    return g * torch.sigmoid(g)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n", [1, 17, 40000])  # under one chunk, ragged, several chunks
def test_silu_mul_matches_fp64(dtype, n):
    g, u = rand(n, dtype=dtype, seed=n), rand(n, dtype=dtype, seed=n + 1)
    got = ew.silu_mul(g, u)
    assert got.dtype == dtype and got.shape == g.shape
    want = silu64(g) * u.double()
    torch.testing.assert_close(got.double(), want.to(dtype).double(), **TOL[dtype])
    # and the reference (ATen's passes, rounding in between)
    torch.testing.assert_close(got.double(), reference.silu_mul(g, u).double(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", [(3, 5), (300, 2048), (2, 7, 96)])  # a few short rows; several chunks; 3-D
def test_silu_mul_of_a_fused_projections_halves(dtype, shape, monkeypatch):
    """The halves of a fused gate/up output (``chunk(2, -1)``: rows with strides) in one C pass, into a fresh
    contiguous output, equal to the contiguous kernel's values; the reference is not called."""
    gu = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, seed=sum(shape))
    g, u = gu.chunk(2, dim=-1)
    assert not g.is_contiguous()
    want = ew.silu_mul(g.contiguous(), u.contiguous())
    monkeypatch.setattr(ew.reference, "silu_mul", None)  # any fallback fails
    got = ew.silu_mul(g, u)
    assert got.is_contiguous() and got.shape == g.shape and got.dtype == dtype
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), (silu64(g) * u.double()).to(dtype).double(), **TOL[dtype])


def test_strided_silu_mul_outside_its_cover_takes_the_reference():
    gu = torch.randn(6, 16)
    g, u = gu.chunk(2, dim=-1)
    cases = ((g, u, torch.empty(6, 8)), (g.t(), u.t(), None), (g, u.double(), None), (g[:, ::2], u[:, ::2], None))
    for a, b, out in cases:
        torch.testing.assert_close(ew.silu_mul(a, b, out=out), reference.silu_mul(a, b))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_silu_mul_backward_matches_autograd_in_fp64(dtype):
    n = 3 * 16384 + 5
    da, g, u = (rand(n, dtype=dtype, seed=s) for s in (1, 2, 3))
    du, dg = ew.silu_mul_backward(da, g, u)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    (F.silu(g64) * u64).backward(da.double())
    torch.testing.assert_close(du.double(), u64.grad.to(dtype).double(), **TOL[dtype])
    torch.testing.assert_close(dg.double(), g64.grad.to(dtype).double(), **TOL[dtype])


def test_silu_extremes_follow_aten():
    g = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30,
                      float("inf"), float("-inf"), float("nan")])
    u = torch.ones_like(g)
    got, want = ew.silu_mul(g, u), reference.silu_mul(g, u)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-37, equal_nan=True)
    du, dg = ew.silu_mul_backward(u, g, u)
    rdu, rdg = reference.silu_mul_backward(u, g, u)
    torch.testing.assert_close(du, rdu, rtol=1e-6, atol=1e-37, equal_nan=True)
    torch.testing.assert_close(dg[:-3], rdg[:-3], rtol=1e-6, atol=1e-37)  # inf/NaN inputs: NaN either way
    assert dg[-3:].isnan().all() == rdg[-3:].isnan().all()


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_outputs_may_be_inputs(dtype):
    """``out=`` an input (the MoE experts write a over g, du over a, dg over da): same values as fresh outputs."""
    da, g, u = (rand(5000, dtype=dtype, seed=s) for s in (4, 5, 6))
    want = ew.silu_mul(g, u)
    g2 = g.clone()
    assert ew.silu_mul(g2, u, out=g2) is g2 and torch.equal(g2, want)
    u2 = u.clone()
    assert torch.equal(ew.silu_mul(g, u2, out=u2), want)
    wdu, wdg = ew.silu_mul_backward(da, g, u)
    for outs in ("da,u", "u,da", "g,da"):
        t = {"da": da.clone(), "g": g.clone(), "u": u.clone()}
        o1, o2 = (t[k] for k in outs.split(","))
        du, dg = ew.silu_mul_backward(t["da"], t["g"], t["u"], du_out=o1, dg_out=o2)
        assert du is o1 and dg is o2
        assert torch.equal(du, wdu) and torch.equal(dg, wdg), outs
    x, w = rand(300, 70, dtype=dtype, seed=7), torch.rand(300)
    want = ew.scale_rows(x, w)
    assert torch.equal(ew.scale_rows(x, w, out=x), want)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("rows,d", [(1, 1), (3, 7), (2000, 64), (513, 4096)])
def test_scale_rows_and_row_dot(dtype, rows, d):
    x, y = rand(rows, d, dtype=dtype, seed=rows), rand(rows, d, dtype=dtype, seed=d)
    w = torch.rand(rows)
    got = ew.scale_rows(x, w)
    assert got.dtype == dtype
    # the product in fp32 (exact for bf16 inputs), rounded once: equal to the reference's promoted multiply
    assert torch.equal(got, reference.scale_rows(x, w))
    dot = ew.row_dot(x, y)
    assert dot.dtype == F32 and dot.shape == (rows,)
    want = (x.double() * y.double()).sum(-1)
    torch.testing.assert_close(dot.double(), want, rtol=1e-5, atol=1e-5 * d ** 0.5 * 9)


def test_uncovered_inputs_take_the_reference():
    g, u = torch.randn(8, 6), torch.randn(8, 6)
    # non-contiguous, mixed dtype, fp64: still right
    torch.testing.assert_close(ew.silu_mul(g.t(), u.t()), reference.silu_mul(g.t(), u.t()))
    torch.testing.assert_close(ew.silu_mul(g, u.double()), reference.silu_mul(g, u.double()))
    torch.testing.assert_close(ew.silu_mul(g.double(), u.double()), reference.silu_mul(g.double(), u.double()))
    # an output overlapping an input partially is not computed in C (ATen refuses it with its message)
    buf = torch.randn(60)
    with pytest.raises(RuntimeError, match="single memory location"):
        ew.silu_mul(buf[:48].view(8, 6), buf[6:54].view(8, 6), out=buf[3:51].view(8, 6))
    # bf16 routing weights: the reference's promotion rules
    x = torch.randn(5, 4, dtype=BF16)
    wb = torch.rand(5, dtype=BF16)
    assert torch.equal(ew.scale_rows(x, wb), reference.scale_rows(x, wb))


def test_autograd_inputs_take_the_reference_and_stay_differentiable():
    g, u = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    ew.silu_mul(g, u).sum().backward()
    g2, u2 = g.detach().requires_grad_(), u.detach().requires_grad_()
    (F.silu(g2) * u2).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)
    torch.testing.assert_close(u.grad, u2.grad)


def test_cpu_platform_resolves_the_native_kernels():
    for op in ("silu_mul", "silu_mul_backward", "scale_rows", "row_dot", "index_add_rows"):
        assert kernel(op, "cpu") is getattr(ew, op)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,K,D", [(1, 1, 1), (5, 3, 7), (300, 6, 64), (1000, 2, 1000)])
def test_index_add_rows_equals_index_add_bit_for_bit(dtype, weighted, T, K, D):
    """Each output row summed as ATen's ``index_add_`` sums it (fp32 from the row's value, the indexing rows in
    order, one rounding), a weighted row first rounded as ``scale_rows``; rows nobody indexes keep their value."""
    g = torch.Generator().manual_seed(T + K + D)
    N = T * K
    idx = torch.randint(0, T, (N,), generator=g)  # repeats, and (for T > 1) rows no route reaches
    src = rand(N, D, dtype=dtype, seed=D)
    w = torch.rand(N, generator=g) if weighted else None
    for init in (torch.zeros(T, D, dtype=dtype), rand(T, D, dtype=dtype, seed=T)):
        want = reference.index_add_rows(init.clone(), idx, src, w)
        out = init.clone()
        assert ew.index_add_rows(out, idx, src, w) is out
        assert torch.equal(out, want)


def test_index_add_rows_rejects_an_index_out_of_range_and_writes_nothing():
    out = torch.ones(4, 3)
    for bad in (4, -1):
        with pytest.raises(IndexError, match="out of range for 4 rows"):
            ew.index_add_rows(out, torch.tensor([0, bad, 1]), torch.ones(3, 3))
    assert torch.equal(out, torch.ones(4, 3))
