"""Row-blocked top-k in the C code generator: where a top-k's row is an fp32 or bf16 input's contiguous row at a
constant stride (MoE routers), AVX-512 CPUs compute 16 rows' top-k at once, a row per lane
(``pf_topk_rows16``), and each row copies its slots. Checked against a stable descending sort (ties to the
lower index, as ATen): ragged last blocks, two threads whose shares start mid-block, strided rows, ties,
infinities and rows holding a NaN (those take the per-row path). On a CPU without AVX-512 the same kernels run
the per-row path, so these run everywhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bagualu.compiler import search
from bagualu.compiler.codegen.cpp import kernel_source

pytestmark = pytest.mark.usefixtures("powerfusion_env")


def _expected(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest k, ties to the lower index, NaN above every number."""
    key = torch.where(torch.isnan(x.float()), torch.inf, x.float())
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    # a NaN ranks above +inf: among the first k, move NaNs ahead (stable)
    nan_first = torch.sort((~torch.isnan(x.gather(-1, order))).to(torch.int8), dim=-1, stable=True).indices
    order = order.gather(-1, nan_first)
    return x.gather(-1, order), order


def _compile(fn, args, monkeypatch) -> tuple[object, list[str]]:
    """Compiled with every kernel split over the threads by rows (as large inputs are; a tiny one would run
    serially), and the kernels' sources."""
    choose, sources = search.choose, []

    def rows(k, gen):
        c = choose(k, gen)
        m = dataclasses.replace(c.mapping, parallel="rows")
        sources.append(kernel_source(k, m).split("int64_t k0(", 1)[-1])
        return dataclasses.replace(c, mapping=m)

    monkeypatch.setattr(search, "choose", rows)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="powerfusion", dynamic=False)(*args)
    monkeypatch.undo()
    return out, sources


@pytest.mark.parametrize("dtype,n", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 13),
                                     (torch.bfloat16, 10), (torch.bfloat16, 9)])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_blocks_equal_a_stable_sort(dtype, n, threads, monkeypatch):
    g = torch.Generator().manual_seed(n)
    wide = torch.randint(-3, 4, (37, n + 5), generator=g).float().to(dtype)  # few values: many ties
    wide[5, 1] = wide[20, n - 1] = float("nan")
    wide[21, :] = float("-inf")
    wide[22, :3] = float("inf")
    wide[36, 0] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in (wide[:, :n].contiguous(), wide[:, 2:n + 2]):  # rows packed, and strided
            for k in (1, 6, 8):
                (gv, gi), srcs = _compile(lambda t, k=k: torch.topk(t, k, dim=-1), (x,), monkeypatch)
                blocked = any("pf_topk_rows16(" in s for s in srcs)
                assert blocked == (dtype == torch.float32 or n % 2 == 0), (dtype, n)  # bf16: n even
                wv, wi = _expected(x, k)
                torch.testing.assert_close(gv, wv, equal_nan=True, atol=0, rtol=0)
                ok = ~torch.isnan(x).any(-1)  # NaN rows: ATen orders equal NaNs arbitrarily
                assert torch.equal(gi[ok], wi[ok]), (k, x.stride())
                assert torch.equal(x.gather(-1, gi)[ok], gv[ok])
    finally:
        torch.set_num_threads(before)


def test_router_blocks_rows_and_counts_every_choice(monkeypatch):
    """The router's pattern (top-k of the logits, softmax of the k, per-expert counts), bf16 logits, 1000 rows
    (a ragged last block), two threads."""
    def router(logits):
        w, i = logits.float().softmax(-1).topk(6, dim=-1)
        counts = torch.zeros(64, dtype=torch.int64).scatter_add_(0, i.flatten(), torch.ones_like(i.flatten()))
        return w / w.sum(-1, keepdim=True), i, counts

    g = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randperm(64, generator=g) for _ in range(1000)]).to(torch.bfloat16) * 0.125 - 4
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (w, i, counts), srcs = _compile(router, (logits,), monkeypatch)
        assert any("pf_topk_rows16(" in s for s in srcs)
    finally:
        torch.set_num_threads(before)
    ww, wi, wc = router(logits)
    assert torch.equal(i, wi) and torch.equal(counts, wc)
    torch.testing.assert_close(w, ww)
