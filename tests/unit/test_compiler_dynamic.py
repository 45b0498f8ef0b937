"""PowerFusion's dynamic-batch mode: a graph whose sizes vary in one symbol compiles once for all of them.

A serving step changes only its token count; compiled per shape, every new count would cost a
compilation. With ``options={"dynamic_batch": True}`` the graph is planned at two sentinel sizes and the
two plans are merged into one kernel set with the size as a runtime argument — or, when they do not
merge (a size-derived float, a non-affine size), it compiles per shape as before. Results equal eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from codegens import CODEGENS, device_for

from bagualu.compiler.dynamic import H1, H2, affine, generalize_source
from bagualu.compiler.graph import REPORTS, SEQ


pytestmark = pytest.mark.usefixtures("powerfusion_env")


DYN = {"dynamic_batch": True}


def mlp_block(x, wn, wg, wu, wd):
    """A decoder MLP on flat tokens [T, D]: RMSNorm, gate/up GEMMs, SwiGLU, down GEMM, residual."""
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wn
    return x + (F.silu(h @ wg) * (h @ wu)) @ wd


def _weights(d=64, f=96):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(d, generator=g), torch.randn(d, f, generator=g) / 8, torch.randn(d, f, generator=g) / 8,
            torch.randn(f, d, generator=g) / 8]


def _run_sizes(fn, sizes, make, options):
    compiled = torch.compile(fn, backend="powerfusion", options=options)
    start = SEQ[0]
    for i, t in enumerate(sizes):
        args = make(t)
        if i == 0:
            torch._dynamo.mark_dynamic(args[0], 0)
        got = compiled(*args)
        torch.testing.assert_close(got, fn(*args), atol=1e-4, rtol=1e-5)
    return [r for r in REPORTS if r.seq >= start]


@pytest.mark.parametrize("codegen", CODEGENS)
def test_token_counts_share_one_compilation(codegen):
    """Both code generators (Triton's under its interpreter on CPU; on a GPU machine, on the GPU)."""
    dev = device_for(codegen)
    w = [t.to(dev) for t in _weights()]
    sizes = [5, 7, 13, 64, 3, 300]
    reports = _run_sizes(mlp_block, sizes, lambda t: [torch.randn(t, 64, device=dev)] + w,
                         {**DYN, "codegen": codegen})
    dyn = [r for r in reports if "dynamic batch" in r.label]
    assert len(dyn) == 1 and dyn[0].kernels, [r.label for r in reports]
    assert len(reports) == 1, [r.label for r in reports]  # no per-shape compilation for any later size


def test_without_the_mode_each_size_compiles():
    w = _weights()
    reports = _run_sizes(mlp_block, [5, 7, 13], lambda t: [torch.randn(t, 64)] + w, {})
    assert len(reports) == 3 and not any("dynamic" in r.label for r in reports)


def test_size_derived_float_falls_back_to_per_shape_compilation(caplog):
    def centre(x):  # the mean over the batch divides by B: a float of the size, not an integer
        return (x - x.mean(0)) * 2

    with caplog.at_level("INFO", logger="bagualu"):
        reports = _run_sizes(centre, [4, 6, 9], lambda t: [torch.randn(t, 32)], DYN)
    assert len([r for r in reports if "dynamic" not in r.label]) == 3
    assert any("compiles per shape" in m for m in caplog.messages), caplog.messages


def test_affine_recovery_and_source_generalisation():
    assert affine(3 * H1 + 5, 3 * H2 + 5) == (3, 5)
    assert affine(H1 // 2, H2 // 2) is None  # not an integer multiple of the size
    assert affine(7, 7) is None
    src = "for (int64_t p = 0; p < {n}; ++p) x[p * 64 + {m}LL] = 1.5f;"
    got = generalize_source(src.format(n=H1, m=64 * H1 - 1), src.format(n=H2, m=64 * H2 - 1))
    assert got == ("for (int64_t p = 0; p < ((int64_t)1LL * n0 + 0LL); ++p) x[p * 64 + "
                   "((int64_t)64LL * n0 + -1LL)] = 1.5f;")
    assert generalize_source("a = 0x1p+30f;", "a = 0x1p+31f;") is None  # a size-derived float
    assert generalize_source("a = b;", "a = c;") is None
