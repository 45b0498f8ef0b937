"""The cost model's per-row charges, through what a user sees: how ``explain`` reports the kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bagualu.compiler import cost, explain
from bagualu.compiler.codegen.cpp import kernel_source
from bagualu.compiler.codegen.cpu import CppCodegen
from bagualu.compiler.graph import REPORTS, SEQ

pytestmark = pytest.mark.usefixtures("powerfusion_env")


def test_a_normalisation_over_a_short_last_dim_is_one_kernel_over_the_rows():
    """w / w.sum(-1) over 6 values per row (a router's renormalisation): one kernel, a row per program
    iteration. A pass over a few elements is a short unrolled loop, so it is not charged a vectorised
    loop's per-row set-up; with that charge the model had split it into a serial column reduction and a
    second kernel (measured 154 us against 58 us for the row kernel, 32768 rows, one Zen 5 core). The
    kernel's prefetch of the next row covers that row, not a 512-element chunk."""
    w = torch.rand(32768, 6) + 0.1
    start = SEQ[0]
    ex = explain(lambda w: w / w.sum(-1, keepdim=True), w, measure=False)
    assert len(ex.kernels) == 1 and ex.kernels[0].domain.startswith("32768 rows x 6"), str(ex)
    (k,) = [k for r in REPORTS if r.seq >= start for k in r.kernels]
    m = k.call.runner.mapping
    src = kernel_source(k.kernel, dataclasses.replace(m, prefetch=True))
    assert "q_ < 6;" in src and "q_ < 512" not in src
    mc = cost.machine(CppCodegen())
    per_row = cost.predict(k.kernel, m, mc) - cost.predict(k.kernel, m, dataclasses.replace(mc, row_s=0.0))
    full_charge = mc.row_s * k.kernel.rows * 2 / mc.threads  # two passes, each row charged in full
    assert 0 < per_row < full_charge / 2
    got = torch.compile(lambda w: w / w.sum(-1, keepdim=True), backend="powerfusion")(w)
    torch.testing.assert_close(got, w / w.sum(-1, keepdim=True))


def test_row_buffers_that_overflow_the_first_level_cache_cost_more():
    """A materialised value's row buffer, next to the row's inputs, either fits the first-level data cache or
    spills to the next level, which the model charges per buffered element (bf16 LayerNorm backward kept
    two 16 KB buffers beside its rows and ran 1.4x slower than recomputing). A 64-wide softmax's buffer
    fits; a 32000-wide one's does not."""
    gen = CppCodegen()
    for width, spills in ((64, False), (32000, True)):
        start = SEQ[0]
        explain(lambda x: torch.softmax(x * 1.5, -1), torch.randn(8, width), measure=False)
        (k,) = [k.kernel for r in REPORTS if r.seq >= start for k in r.kernels]
        (e,) = [v.id for v in k.values if v.op == "exp"]
        m = dataclasses.replace(gen.candidates(k)[0], materialize=frozenset({e}), stream=False)
        mc = dataclasses.replace(cost.machine(gen), l1_bytes=48 << 10)
        extra = cost.predict(k, m, mc) - cost.predict(k, m, dataclasses.replace(mc, l1_bytes=0))
        assert (extra > 0) == spills, (width, extra)
