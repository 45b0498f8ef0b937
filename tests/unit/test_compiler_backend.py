"""The powerfusion ``torch.compile`` back-end: discovery, fallbacks with reasons, shapes, safety nets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bagualu.compiler import explain


pytestmark = pytest.mark.usefixtures("powerfusion_env")


def test_backend_found_by_name_without_importing_bagualu(tmp_path):
    code = ("import sys, torch\n"
            "f = torch.compile(lambda x: torch.softmax(x * 2, -1), backend='powerfusion')\n"
            "x = torch.randn(4, 33)\n"
            "assert torch.allclose(f(x), torch.softmax(x * 2, -1), atol=1e-6)\n"
            "assert 'powerfusion' in torch._dynamo.list_backends()\n"
            "assert 'bagualu.compiler.backend' in sys.modules\n"
            "print('ok')\n")
    env = dict(os.environ, BAGUALU_CACHE_DIR=str(tmp_path / "cache"), BAGUALU_NO_MEASURE="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_gemms_stay_aten_and_unsupported_ops_fall_back_with_reasons():
    w = torch.randn(32, 64)

    def f(x):
        h = F.silu(x @ w.t()) * 2.0  # mm -> vendor; silu*2 -> fused
        return torch.cumsum(h, dim=-1) + 1  # cumsum: no lowering -> ATen; + 1 fused
    x = torch.randn(8, 64)
    ex = explain(f, x, measure=False)
    assert "aten.mm.default" in ex.fallback_ops(vendor=True)
    reasons = {op: r for _, _, op, r, vendor in ex.fallbacks if not vendor}
    assert reasons.get("aten.cumsum.default") == "no lowering for this op"
    assert len(ex.kernels) == 2 and "fallbacks to ATen (op: reason)" in str(ex)
    torch.testing.assert_close(torch.compile(f, backend="powerfusion")(x), f(x))


def test_recompiles_per_shape_and_specialises_dynamic_shapes():
    def f(x):
        return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)
    g = torch.compile(f, backend="powerfusion")
    for shape in [(4, 16), (7, 16), (7, 40), (3, 5, 40)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(g(x), f(x), atol=1e-5, rtol=1e-5)
    from bagualu.compiler.report import record

    h = torch.compile(f, backend="powerfusion", dynamic=True)  # symbolic shapes: one specialisation per shape
    with record(measure=False) as ex:
        for shape in [(4, 16), (9, 24), (4, 16)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(h(x), f(x), atol=1e-5, rtol=1e-5)
    assert len(ex.graphs) == 2 and len(ex.kernels) == 2, str(ex)


def test_inputs_laid_out_differently_run_the_regions_aten_ops():
    """Compiled for contiguous inputs; a transposed input of the same shape must still be right."""
    from bagualu.compiler import graph as G
    from bagualu.compiler.lower import Region  # noqa: F401

    g = torch.compile(lambda x: torch.exp(x) * 3, backend="powerfusion")
    x = torch.randn(16, 16)
    g(x)
    call = next(k.call for r in reversed(G.REPORTS) for k in r.kernels if k.call is not None)
    xt = torch.randn(16, 16).t()
    (out,) = call(xt)
    torch.testing.assert_close(out, torch.exp(xt) * 3)
    assert call.warned


def test_without_a_code_generator_everything_runs_on_aten(monkeypatch):
    from bagualu.compiler import graph as G

    monkeypatch.setattr(G, "current_codegen", lambda name=None: (None, "platform 'x' names no compiler code generator"))
    f = lambda x: F.gelu(x) * x.sum(-1, keepdim=True)  # noqa: E731
    x = torch.randn(5, 7)
    ex = explain(f, x, measure=False)
    assert any("names no compiler code generator" in n for n in ex.notes)
    torch.testing.assert_close(torch.compile(f, backend="powerfusion")(x), f(x))


def test_gather_index_out_of_range_raises_like_aten():
    def f(x, i):
        return torch.gather(x * 2, 1, i)
    x = torch.randn(4, 10)
    good = torch.randint(0, 10, (4, 3))
    g = torch.compile(f, backend="powerfusion")
    torch.testing.assert_close(g(x, good), f(x, good))
    with pytest.raises(IndexError, match="out of range"):
        g(x, torch.full((4, 3), 10))


def test_training_step_gradients_match_eager():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)

    def loss_fn(x, t):
        h = F.layer_norm(F.silu(lin(x)) + x, (64,))
        return F.cross_entropy(h, t)
    x, t = torch.randn(32, 64, requires_grad=True), torch.randint(0, 64, (32,))
    comp = torch.compile(loss_fn, backend="powerfusion")
    l1 = comp(x, t)
    g1 = torch.autograd.grad(l1, [x, lin.weight])
    l2 = loss_fn(x, t)
    g2 = torch.autograd.grad(l2, [x, lin.weight])
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_backward_run_inside_a_compiled_frame_is_not_traced_by_dynamo():
    """``backward()`` called in a function Dynamo compiles (a graph break there) runs the compiled backward with
    Dynamo's frame callback active: the graph switches it off, so the regions' Python is never traced (the
    outer function has no tensor op of its own, so no graph reaches its back-end) and the gradients are
    eager's."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x: (F.layer_norm(x, (64,)) * 2).softmax(-1).sum(), backend="powerfusion")

    @torch.compile(backend=record)
    def backward(loss):
        loss.backward()
        return 1

    x = torch.randn(128, 64, requires_grad=True)
    for _ in range(2):
        x.grad = None
        backward(f(x))
    x2 = x.detach().clone().requires_grad_()
    (F.layer_norm(x2, (64,)) * 2).softmax(-1).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    assert not graphs, [g.code for g in graphs]


def test_bad_option_names_the_known_ones():
    with pytest.raises(Exception, match="known: \\['codegen', 'dynamic_batch', 'partition'\\]"):
        torch.compile(lambda x: x + 1, backend="powerfusion", options={"bogus": 1})(torch.randn(3))


def test_exp_within_one_ulp_over_its_range_and_flushes_only_below_1p7e_38():
    """The C generator's vectorised exp (cpp_prelude.pf_exp) against fp64 on 2M values spanning every
    binade, plus the edges: overflow to inf, the flush-to-zero bottom (and either side of the -87.5 select),
    NaN, infinities and huge finite values."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (2_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.linspace(-105, -80, 200_001), torch.linspace(80, 89, 200_001),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.72283935546875,
                                 88.7228470, -86.28, -86.2799, -86.99, -87.0, -87.5, -87.50001, -87.7,
                                 89.0, 100.0, 1e30, -1e30, 3.4e38, -3.4e38])])
    torch._dynamo.reset()
    y = torch.compile(lambda t: torch.exp(t), backend="powerfusion")(x)
    ref = torch.exp(x.double())
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all() and not torch.isnan(y[~nan]).any()
    flushed = ref < 1.7e-38
    assert (y[flushed & ~nan] <= ref[flushed & ~nan] * 1.0001 + 1e-45).all()  # zero, or exact near the bound
    assert (y[ref > 3.4029e38] == float("inf")).all()
    ok = ~nan & ~flushed & (ref <= 3.4028e38)
    ulp = (y[ok].view(torch.int32).long() - ref[ok].float().view(torch.int32).long()).abs()
    assert ulp.max() <= 1


def test_bf16_max_and_min_on_integer_keys_match_eager(monkeypatch, tmp_path):
    """A max/min over bf16 loads reduces the bits' order-preserving integer keys (codegen/cpp.py): the same
    values as eager, NaNs (either sign) propagating, infinities, signed zeros and all-(-inf) rows included."""
    from bagualu.compiler.codegen.build import compiler

    if compiler() is None:
        pytest.skip("no C compiler: the regions run on ATen")
    monkeypatch.setenv("BAGUALU_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 300, generator=g) * 3).bfloat16()
    x[0, 5] = float("nan")
    x[1] = -float("inf")
    x[2, 17] = float("inf")
    x[3] = 0.0
    x[3, ::3] = -0.0
    x[4, 9] = -1e38
    x[5].view(torch.int16)[42] = -64  # 0xffc0: a NaN with the sign bit set
    x[6] = -0.0
    x[7, 299] = float("inf")
    x[7, 0] = -float("inf")

    def f(t):
        return t.amax(-1), t.amin(-1), torch.softmax(t.float(), -1)

    got = torch.compile(f, backend="powerfusion")(x)
    want = f(x)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], equal_nan=True)  # exp to within an ulp of ATen's
    src = "\n".join(p.read_text() for p in tmp_path.rglob("*.c"))
    assert "_k = -32641;" in src and "_k = 32640;" in src  # the keyed max and min were generated
