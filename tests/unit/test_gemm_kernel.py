"""The CPU grouped GEMM (``ops.gemm_cpu``, ``csrc/gemm_cpu.cpp``) against ``ops.reference.grouped_mm`` and fp64."""

from __future__ import annotations

import pytest
import torch

from bagualu.ops import gemm_cpu, kernel, native, reference

pytestmark = pytest.mark.skipif(gemm_cpu._loaded() is None, reason="no C++ compiler: the kernel is not built")

F32, BF16 = torch.float32, torch.bfloat16


def operand(rows, cols, dtype, transposed, g):
    """A [rows, cols] operand, as itself or as the transposed view of a [cols, rows] tensor."""
    t = torch.randn(cols, rows, generator=g).t() if transposed else torch.randn(rows, cols, generator=g)
    return t.to(dtype)


def check(a, b, out, accumulate):
    want = a.double() @ b.double() + (out.double() if accumulate else 0)
    gemm_cpu.grouped_mm([(a, b, out, accumulate)])
    # fp32: rounding of K products; bf16 out: one bf16 rounding of the result
    tol = 2e-5 * a.shape[1] ** 0.5 + (8e-3 if out.dtype is BF16 else 0)
    scale = want.abs().max().item() if want.numel() else 1.0
    assert (out.double() - want).abs().max().item() <= tol * max(scale, 1.0)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 3, 7), (6, 16, 16), (7, 17, 33), (13, 300, 37), (130, 520, 50)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_layouts_and_edge_sizes(M, K, N, ta, tb):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    for accumulate in (False, True):
        check(operand(M, K, F32, ta, g), operand(K, N, F32, tb, g), torch.randn(M, N, generator=g), accumulate)


@pytest.mark.parametrize("da,db,dc", [(BF16, BF16, BF16), (BF16, F32, F32), (F32, BF16, BF16), (BF16, BF16, F32)])
@pytest.mark.parametrize("tb", [False, True])
def test_bf16_operands_and_outputs(da, db, dc, tb):
    g = torch.Generator().manual_seed(7)
    for accumulate in (False, True):
        a, b = operand(70, 300, da, False, g), operand(300, 45, db, tb, g)
        check(a, b, torch.randn(70, 45, generator=g).to(dc), accumulate)


@pytest.mark.parametrize("M,K,N", [(5, 3, 7), (12, 16, 32), (13, 17, 33), (25, 401, 40), (130, 777, 50)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_bf16_times_bf16_every_layout_and_edge(M, K, N, ta, tb):
    """Both operands bf16: on CPUs with AVX512-BF16 the pair-packed vdpbf16ps path (odd K pads its last pair,
    K = 401 and 777 cross the 384-deep blocks), elsewhere the widening one; fp32 and bf16 outputs."""
    g = torch.Generator().manual_seed(M + 7 * K + 13 * N)
    for dc in (F32, BF16):
        for accumulate in (False, True):
            a, b = operand(M, K, BF16, ta, g), operand(K, N, BF16, tb, g)
            check(a, b, torch.randn(M, N, generator=g).to(dc), accumulate)


def test_bf16_output_is_rounded_once_to_nearest_even():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 64, generator=g), torch.randn(64, 30, generator=g)
    out = torch.empty(20, 30, dtype=BF16)
    gemm_cpu.grouped_mm([(a, b, out, False)])
    fp32 = torch.empty(20, 30)
    gemm_cpu.grouped_mm([(a, b, fp32, False)])
    assert torch.equal(out, fp32.to(BF16))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("K", [64, 1100])
def test_bf16_output_equals_the_fp32_result_rounded_once_across_k_blocks(dtype, K):
    """A bf16 C (written from the accumulators on the last K block on AVX-512, after the earlier blocks' fp32
    partial sums; through an fp32 tile elsewhere) is the fp32 result rounded once, also when it accumulates
    onto C's own values (rounded after adding them), for K within one block and across several, edges
    included (M 37 and N 45 are not tile multiples)."""
    g = torch.Generator().manual_seed(K)
    a, b = operand(37, K, dtype, False, g), operand(K, 45, dtype, True, g)
    fp32 = torch.empty(37, 45)
    gemm_cpu.grouped_mm([(a, b, fp32, False)])
    out = torch.empty(37, 45, dtype=BF16)
    gemm_cpu.grouped_mm([(a, b, out, False)])
    assert torch.equal(out, fp32.to(BF16))
    c0 = torch.randn(37, 45, generator=g).to(BF16)
    out = c0.clone()
    gemm_cpu.grouped_mm([(a, b, out, True)])
    assert torch.equal(out, (c0.float() + fp32).to(BF16))


def test_empty_problems():
    out = torch.full((4, 3), 5.0)
    gemm_cpu.grouped_mm([(torch.randn(4, 0), torch.randn(0, 3), out, True)])
    assert torch.equal(out, torch.full((4, 3), 5.0))  # K = 0: adds nothing
    gemm_cpu.grouped_mm([(torch.randn(4, 0), torch.randn(0, 3), out, False)])
    assert torch.equal(out, torch.zeros(4, 3))  # K = 0: the empty sum
    gemm_cpu.grouped_mm([(torch.randn(0, 5), torch.randn(5, 3), torch.empty(0, 3), False),
                         (torch.randn(2, 5), torch.randn(5, 0), torch.empty(2, 0), False)])


def test_a_group_of_expert_slices_equals_the_reference():
    """The MoE shapes: each expert's rows into its slice of one output, transposed weights, ragged counts."""
    g = torch.Generator().manual_seed(0)
    E, D, F = 8, 96, 160
    counts = [0, 3, 200, 1, 40, 0, 7, 333]
    x = torch.randn(sum(counts), D, generator=g)
    w = torch.randn(E, F, D, generator=g)
    ours, ref = torch.full((sum(counts), F), float("nan")), torch.full((sum(counts), F), float("nan"))
    problems = lambda out: [(x[s:s + n], w[e].t(), out[s:s + n], False)  # noqa: E731
                            for e, (s, n) in enumerate(zip([sum(counts[:i]) for i in range(E)], counts)) if n]
    gemm_cpu.grouped_mm(problems(ours))
    reference.grouped_mm(problems(ref))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_results_do_not_depend_on_threads_grouping_or_row_position():
    """Each output's summation order is fixed (K in blocks, in order): the same bits on 1 or 2 threads,
    alone or in a group, at any row offset — what lets expert parallelism reproduce one process exactly."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(37, 300, generator=g), torch.randn(300, 96, generator=g)
    n = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for extra in (0, 7):
                out = torch.empty(37, 96)
                others = [(torch.randn(50, 300), torch.randn(300, 96), torch.empty(50, 96), False) for _ in range(extra)]
                gemm_cpu.grouped_mm([*others, (a, b, out, False)])
                results.append(out)
    finally:
        torch.set_num_threads(n)
    big = torch.randn(100, 300, generator=g)
    big[20:57] = a
    whole = torch.empty(100, 96)
    gemm_cpu.grouped_mm([(big, b, whole, False)])
    results.append(whole[20:57])
    assert all(torch.equal(r, results[0]) for r in results)


def test_uncovered_problems_go_to_the_reference():
    g = torch.Generator().manual_seed(2)
    a16, b16 = torch.randn(8, 16, generator=g).half(), torch.randn(16, 4, generator=g).half()
    out16 = torch.empty(8, 4, dtype=torch.float16)
    assert not gemm_cpu.covers(a16, b16, out16)
    a = torch.randn(8, 16, generator=g, requires_grad=True)
    assert not gemm_cpu.covers(a, torch.randn(16, 4), torch.empty(8, 4))
    assert not gemm_cpu.covers(torch.randn(8, 16), torch.randn(16, 4), torch.empty(4, 8).t())  # column-major out
    ok_a, ok_b, ok_out = torch.randn(8, 16, generator=g), torch.randn(16, 4, generator=g), torch.empty(8, 4)
    gemm_cpu.grouped_mm([(a16, b16, out16, False), (ok_a, ok_b, ok_out, False)])
    torch.testing.assert_close(out16, (a16.float() @ b16.float()).half())
    torch.testing.assert_close(ok_out, ok_a @ ok_b)


def test_cpu_platform_resolves_the_native_kernel_and_the_reference_falls_back(monkeypatch):
    assert kernel("grouped_mm", "cpu") is gemm_cpu.grouped_mm
    monkeypatch.setattr(gemm_cpu, "_kernel", None)  # as without a compiler: every problem through the reference
    a, b, out = torch.randn(9, 12), torch.randn(12, 5), torch.empty(9, 5)
    gemm_cpu.grouped_mm([(a, b, out, False)])
    torch.testing.assert_close(out, a @ b)


@pytest.mark.parametrize("flag,isas", [("-DBGL_SCALAR", ("scalar",)), ("-DBGL_NO_AVX512", ("scalar", "avx2"))])
def test_narrower_builds_match_reference(flag, isas):
    """The scalar build, and the AVX2 build on a CPU that has AVX-512 (what an AVX2-only CPU runs)."""
    lib = native.load("gemm_cpu" + flag.lower().replace("-dbgl", ""), "gemm_cpu.cpp", (flag,))
    built = gemm_cpu.GroupedGemmKernel(lib)
    assert built.isa in isas
    g = torch.Generator().manual_seed(4)
    for da, db in ((F32, BF16), (BF16, BF16), (F32, F32)):
        for ta, tb in ((False, True), (True, False)):
            a, b = operand(29, 70, da, ta, g), operand(70, 41, db, tb, g)
            out, ref = torch.randn(29, 41, generator=g), torch.empty(29, 41)
            ref.copy_(out)
            built([(a, b, out, True)])
            reference.grouped_mm([(a, b, ref, True)])
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_general_strides():
    """Neither operand with a unit stride (every other row, every third column): the scalar packing paths."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(70, 60, generator=g)[:60:2, ::2]  # [30, 30], strides (120, 2)
    for dtype in (F32, BF16):
        a = torch.randn(80, 90, generator=g).to(dtype)[::2, ::3]  # [40, 30], strides (180, 3)
        assert a.stride() == (180, 3) and gemm_cpu.covers(a, b, torch.empty(40, 30))
        for bb in (b, b.to(dtype)):  # bf16 x bf16: the pair packing's scalar paths
            check(a, bb, torch.empty(40, 30), False)
            check(a, bb, torch.randn(40, 30, generator=g), True)
