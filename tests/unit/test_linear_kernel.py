"""The CPU ``linear`` kernel equals ``F.linear`` (fp32 and bf16 weights, bias, odd sizes, strided inputs) and
hands anything it does not cover to the reference."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from bagualu.ops import kernel, linear_cpu, reference


@pytest.fixture(scope="module")
def fast():
    lib = __import__("bagualu.ops.native", fromlist=["load"]).load("linear_cpu", "linear_cpu.cpp")
    if lib is None:
        pytest.skip("no C++ compiler: the reference is used")
    return linear_cpu.LinearKernel(lib)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 17, 64, 130])
@pytest.mark.parametrize("N,K", [(8, 16), (13, 37), (96, 64), (257, 200)])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_equals_f_linear(fast, M, N, K, wdt):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(wdt)
    b = torch.randn(N, generator=g)
    before = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            ref = F.linear(x, w.float(), b)
            torch.testing.assert_close(fast(x, w, b), ref, rtol=1e-5, atol=1e-5 * K)
            torch.testing.assert_close(fast(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-5 * K)
    finally:
        torch.set_num_threads(before)


def test_batched_and_strided_inputs(fast):
    x = torch.randn(4, 6, 40)[:, ::2]  # [4, 3, 40], non-contiguous rows
    w = torch.randn(24, 40)
    torch.testing.assert_close(fast(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    qkv = torch.randn(5, 100)[:, 10:50]  # a column slice: unit stride, row stride 100
    torch.testing.assert_close(fast(qkv, w), F.linear(qkv, w), rtol=1e-5, atol=1e-4)
    assert fast(torch.randn(0, 40), w).shape == (0, 24)


def test_uncovered_inputs_go_to_the_reference(fast):
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    y = fast(x, w)
    y.sum().backward()  # autograd works: the reference ran
    assert x.grad is not None and w.grad is not None
    xb = torch.randn(3, 16, dtype=torch.bfloat16)
    wb = torch.randn(8, 16, dtype=torch.bfloat16)
    assert fast(xb, wb).dtype == torch.bfloat16
    assert reference.linear(torch.randn(2, 16), wb).dtype == torch.float32  # narrow weights are widened


@pytest.mark.parametrize("grouped", [True, False])
def test_many_rows_go_to_the_grouped_gemm_or_the_blas(fast, monkeypatch, grouped):
    """Above ``MAX_ROWS_FP32``/``MAX_ROWS_BF16`` rows (a prefill chunk) the tiles are not called: the grouped GEMM
    runs it (a bf16 weight read as stored), or without that kernel the BLAS sgemm (a bf16 weight widened into
    a reused fp32 buffer; a smaller weight after a larger one reuses the buffer's front)."""
    from bagualu.ops import gemm_cpu

    if grouped and gemm_cpu._loaded() is None:
        pytest.skip("no grouped GEMM kernel")
    if not grouped:
        monkeypatch.setattr(gemm_cpu, "_kernel", None)
    monkeypatch.setattr(linear_cpu, "MAX_ROWS_BF16", 8)
    monkeypatch.setattr(linear_cpu, "MAX_ROWS_FP32", 8)
    monkeypatch.setattr(linear_cpu._wide, "buf", None, raising=False)
    with torch.inference_mode():  # the buffer made under inference mode (the engine's) serves outside it too
        fast(torch.randn(9, 64), torch.randn(128, 64).bfloat16())  # larger than every weight below
    assert (getattr(linear_cpu._wide, "buf", None) is None) == grouped
    calls, grouped_calls = [], []
    monkeypatch.setattr(fast, "_run", lambda *a: calls.append(a))
    if grouped:
        real = gemm_cpu.grouped_mm
        monkeypatch.setattr(gemm_cpu, "grouped_mm", lambda p: (grouped_calls.append(len(p)), real(p)))
    g = torch.Generator().manual_seed(3)
    for wdt in (torch.bfloat16, torch.float32):
        for N, K in ((96, 64), (13, 37), (96, 64)):
            x, w, b = torch.randn(20, K, generator=g), torch.randn(N, K, generator=g).to(wdt), torch.randn(N, generator=g)
            torch.testing.assert_close(fast(x, w, b), F.linear(x, w.float(), b), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast(x[:, None], w), F.linear(x[:, None], w.float()), rtol=1e-5, atol=1e-5)
    assert not calls and len(grouped_calls) == (12 if grouped else 0)
    fast(torch.randn(8, 64), torch.randn(4, 64).bfloat16())  # at the limit: the tiles
    assert len(calls) == 1


def test_the_cpu_linear_reads_bf16_weights_as_stored(fast):
    from bagualu.ops import linear_weight_dtypes

    assert linear_weight_dtypes("cpu") == (torch.float32, torch.bfloat16)


def test_registered_for_the_cpu_platform():
    assert kernel("linear", "cpu") is linear_cpu.linear
    x, w = torch.randn(3, 32), torch.randn(16, 32)
    torch.testing.assert_close(kernel("linear", "cpu")(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.fixture
def split_everything(monkeypatch):
    """Every call split over 2 threads into the smallest chunks the kernel allows (the default policy keeps
    small GEMMs whole): one tile at one row; at several rows runs of up to 16 tiles, at least two chunks per
    thread (N=96: 4 chunks of 4 tiles; N=1001: 11 of 16, the last short, then the 5 rows no tile covers)."""
    monkeypatch.setattr(linear_cpu, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(linear_cpu, "CHUNK_WORK", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("N", [1, 7, 8, 13, 96, 1001])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_chunked_over_helper_threads(fast, split_everything, M, N, wdt):
    g = torch.Generator().manual_seed(M * 7 + N)
    x, w, b = torch.randn(M, 40, generator=g), torch.randn(N, 40, generator=g).to(wdt), torch.randn(N, generator=g)
    for _ in range(3):  # helpers asleep, then spinning
        torch.testing.assert_close(fast(x, w, b), F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4)


def test_concurrent_callers_and_forked_child(fast, split_everything):
    """A second caller runs its chunks inline while the first holds the helpers; a forked child (whose
    helper threads did not survive the fork) still computes everything."""
    import multiprocessing as mp
    import threading

    w = torch.randn(1000, 64)
    xs = [torch.randn(3, 64) for _ in range(4)]
    want = [F.linear(x, w) for x in xs]
    errors = []

    def loop(i):
        for _ in range(50):
            if not torch.allclose(fast(xs[i], w), want[i], rtol=1e-5, atol=1e-4):
                errors.append(i)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_child_checks, args=(fast, w, xs[0], want[0]))
    p.start()
    p.join(60)
    assert p.exitcode == 0


def _child_checks(fast, w, x, want):
    import os

    ok = all(torch.allclose(fast(x, w), want, rtol=1e-5, atol=1e-4) for _ in range(20))
    os._exit(0 if ok else 1)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_a_group_computes_each_problem_as_one_call(fast, wdt, split):
    """``bgl_linear_group`` (an MoE layer's expert projections in one job) gives every problem bit for bit what
    ``bgl_linear`` gives it alone: odd sizes, 1-5 rows, bias or not, row strides, empty problems."""
    import ctypes

    lib = __import__("bagualu.ops.native", fromlist=["load"]).load("linear_cpu", "linear_cpu.cpp")
    g = torch.Generator().manual_seed(11)
    shapes = [(1, 64, 32), (3, 13, 37), (5, 200, 48), (0, 8, 16), (2, 9, 8), (1, 7, 100)]
    xs = [torch.randn(M, K + 3, generator=g)[:, :K] for M, _, K in shapes]  # row stride K + 3
    ws = [torch.randn(N, K, generator=g).to(wdt) for _, N, K in shapes]
    bs = [torch.randn(N, generator=g) if i % 2 else None for i, (_, N, _) in enumerate(shapes)]
    ys = [torch.full((M, N), float("nan")) for M, N, _ in shapes]
    probs = (linear_cpu.Gemm * len(shapes))(*[
        linear_cpu.Gemm(x.data_ptr(), x.stride(0) if x.numel() else x.shape[1], w.data_ptr(),
                        None if b is None else b.data_ptr(), y.data_ptr(), y.shape[1], *s)
        for x, w, b, y, s in zip(xs, ws, bs, ys, shapes)])
    work, chunk = (1, 1) if split else (linear_cpu.MIN_WORK_PER_THREAD, linear_cpu.CHUNK_WORK)
    lib.bgl_linear_group.restype = None
    lib.bgl_linear_group(probs, ctypes.c_int64(len(shapes)), ctypes.c_int(int(wdt is torch.bfloat16)), ctypes.c_int(2),
                         ctypes.c_int64(work), ctypes.c_int64(chunk))
    for x, w, b, y in zip(xs, ws, bs, ys):
        one = torch.full_like(y, float("nan"))
        if x.shape[0]:
            fast._run(x.data_ptr(), x.stride(0), w.data_ptr(), int(wdt is torch.bfloat16),
                      None if b is None else b.data_ptr(), one.data_ptr(), one.shape[1], *x.shape[:1], one.shape[1],
                      x.shape[1], 2, work, chunk)
        assert torch.equal(y, one)
        torch.testing.assert_close(y, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4)


def test_many_row_calls_handed_to_the_grouped_gemm(fast):
    """``bgl_linear`` hands calls of at least the set number of rows to the grouped GEMM (AVX-512 builds set
    32): forced here from 1 row on, on any CPU, bias and bf16 weights included; then restored."""
    from bagualu.ops import gemm_cpu

    g = gemm_cpu._loaded()
    if g is None:
        pytest.skip("no grouped GEMM kernel")
    lib = linear_cpu.library()
    restore = gemm_cpu.LINEAR_HANDOFF_ROWS if g.isa.startswith("avx512") else 0
    lib.bgl_linear_set_gemm(ctypes.cast(g.lib.bgl_gemm_group, ctypes.c_void_p), 1)
    try:
        gen = torch.Generator().manual_seed(11)
        for wdt in (torch.float32, torch.bfloat16):
            for M in (1, 5, 40):
                x, w, b = torch.randn(M, 70, generator=gen), torch.randn(33, 70, generator=gen).to(wdt), torch.randn(33, generator=gen)
                torch.testing.assert_close(fast(x, w, b), F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(fast(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-4)
    finally:
        lib.bgl_linear_set_gemm(ctypes.cast(g.lib.bgl_gemm_group, ctypes.c_void_p), restore)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_its_batch(fast, wdt):
    """Every output sums in one order whatever the row count and tile (1-row tiles, row tiles, tails), so a
    sequence decodes the same numbers in a batch of 1 or of 13."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(13, 203, generator=g), torch.randn(37, 203, generator=g).to(wdt)
    full = fast(x, w)
    for m in (1, 2, 3, 5):
        assert torch.equal(fast(x[:m], w), full[:m])
    assert torch.equal(fast(x[7:8], w), full[7:8])


def test_narrower_builds_match_reference():
    """The AVX2 tiles (what an AVX2-only CPU runs) built on a CPU that has AVX-512, and the scalar loops."""
    from bagualu.ops import native

    for name, flags, isa in (("noavx512", ("-DBGL_NO_AVX512",), "avx2"),
                             ("scalar", ("-U__AVX512F__", "-U__AVX2__"), "scalar")):
        lib = native.load("linear_cpu_" + name, "linear_cpu.cpp", flags)
        if lib is None:
            pytest.skip("no C++ compiler")
        k = linear_cpu.LinearKernel(lib)
        assert k.isa in (isa, "scalar")
        g = torch.Generator().manual_seed(3)
        for M, N, K in ((1, 19, 45), (4, 24, 64), (7, 13, 37)):
            x, b = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
            for wdt in (torch.float32, torch.bfloat16):
                w = torch.randn(N, K, generator=g).to(wdt)
                torch.testing.assert_close(k(x, w, b), F.linear(x, w.float(), b), rtol=1e-5, atol=1e-5 * K)
                half = F.linear(x.to(wdt).float(), w.float(), b)  # x rounded to bf16 (to itself for fp32 weights)
                torch.testing.assert_close(k(x, w, b, half_operands=True), half, rtol=1e-5, atol=1e-5 * K)


@pytest.mark.parametrize("M", [1, 3, 4, 9, 64, 130, 300])
def test_half_operands_round_the_input(fast, M):
    """``half_operands=True`` with bf16 weights: x rounded to bf16 first (autocast's rule), fp32 accumulation —
    vdpbf16ps tiles on AVX512-BF16 CPUs, the packed GEMM's bf16 path from 128 rows, above ``MAX_ROWS_BF16`` the
    many-row path; the same numbers up to summation order, and not those of the unrounded input."""
    g = torch.Generator().manual_seed(M)
    for K in (45, 64, 200):
        x, w, b = torch.randn(M, K, generator=g), torch.randn(37, K, generator=g).bfloat16(), torch.randn(37, generator=g)
        want = F.linear(x.bfloat16().float(), w.float(), b)
        got = fast(x, w, b, half_operands=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * K)
        assert (F.linear(x, w.float(), b) - want).abs().max() > 1e-3
        torch.testing.assert_close(reference.linear(x, w, b, half_operands=True), want, rtol=1e-5, atol=1e-5 * K)
    fp32_w = torch.randn(5, 16, generator=g)
    x = torch.randn(3, 16, generator=g)
    assert torch.equal(fast(x, fp32_w, half_operands=True), fast(x, fp32_w))  # fp32 weights: nothing to round to


@pytest.fixture(params=[(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)],
                ids=["bf16-amx", "bf16-avx512", "fp32"])
def packed(fast, request):
    """The packed weights' dtype; skipped where this build has no packed tiles for it (bf16: AVX512-BF16,
    fp32: AVX-512). bf16 runs twice: on AMX tiles (skipped without them; problems with K % 32 != 0 take the
    AVX512-BF16 tiles there too) and with AMX switched off."""
    dtype, amx = request.param
    if not linear_cpu.packed_available(dtype):
        pytest.skip(f"no packed tiles for {dtype} on this CPU")
    was = linear_cpu.amx_tiles()
    if amx and not was:
        pytest.skip("no AMX tiles on this CPU (or the OS does not grant them)")
    linear_cpu.amx_tiles(amx)
    yield dtype
    linear_cpu.amx_tiles(was)


def _pack(w: torch.Tensor):
    return linear_cpu.pack_bf16(w) if w.dtype is torch.bfloat16 else linear_cpu.pack_f32(w)


def _rows(x, w, b=None):
    """What the packed tiles must equal: the row tiles on the original weight (bf16: half operands)."""
    return linear_cpu.linear(x, w, b, half_operands=w.dtype is torch.bfloat16)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 9, 14, 33])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 47, 48, 49, 97, 200])
def test_packed_weights_equal_the_row_tiles(packed, split_everything, M, N):
    """``pack_bf16``/``pack_f32`` + ``linear_packed``: what ``linear`` computes on the original weight (bf16 with
    ``half_operands``) to rounding (the same products, summed in another order), for every column tail (N % 16,
    N % 48), row tail (M % 8) and K tail, chunked over 2 threads; an output row's columns past N untouched."""
    g = torch.Generator().manual_seed(M * 1000 + N)
    for K in (2, 64, 770, 800):
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).to(packed)
        b = torch.randn(N, generator=g) if N % 2 else None
        pw = _pack(w)
        shape = (-(-N // 16), K // 2, 16, 2) if packed is torch.bfloat16 else (-(-N // 16), K, 16)
        assert pw.data.shape == shape and pw.nbytes == pw.data.numel() * pw.data.element_size()
        got = linear_cpu.linear_packed(x, pw, b)
        assert got.shape == (M, N)
        torch.testing.assert_close(got, _rows(x, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)
        xr = x.bfloat16().float() if packed is torch.bfloat16 else x
        torch.testing.assert_close(got, F.linear(xr, w.float(), b), rtol=1e-5, atol=1e-5 * K ** 0.5)
        assert torch.equal(linear_cpu.linear_packed(x.view(1, M, K), pw, b), got.view(1, M, N))
        wide = torch.full((M, N + 5), float("nan"))  # an output row stride past N: those columns untouched
        linear_cpu._loaded()._run(x.data_ptr(), K, pw.data.data_ptr(), pw.code, None if b is None else b.data_ptr(),
                                  wide.data_ptr(), N + 5, M, N, K, 2, 1, 1)
        assert torch.equal(wide[:, :N], got) and wide[:, N:].isnan().all()


def test_a_packed_row_does_not_depend_on_its_batch(packed, split_everything):
    """Each output sums over k in order whatever M and the tile: a row's result is the same alone or in a batch."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(37, 256, generator=g), torch.randn(300, 256, generator=g).to(packed)
    pw = _pack(w)
    full = linear_cpu.linear_packed(x, pw)
    for i in (0, 5, 36):
        assert torch.equal(linear_cpu.linear_packed(x[i:i + 1], pw), full[i:i + 1])
        assert torch.equal(linear_cpu.linear_packed(x[i:i + 6], pw)[0], full[i])


def test_packed_group_matches_single_calls(packed):
    """``bgl_linear_group`` on packed weights gives each problem what ``bgl_linear`` gives it."""
    import ctypes

    lib = __import__("bagualu.ops.native", fromlist=["load"]).load("linear_cpu", "linear_cpu.cpp")
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 64, 32), (9, 200, 48), (0, 16, 16), (33, 97, 770)]
    xs = [torch.randn(M, K, generator=g) for M, _, K in shapes]
    pws = [_pack(torch.randn(N, K, generator=g).to(packed)) for _, N, K in shapes]
    ys = [torch.full((M, N), float("nan")) for M, N, _ in shapes]
    probs = (linear_cpu.Gemm * len(shapes))(*[
        linear_cpu.Gemm(x.data_ptr(), x.shape[1], p.data.data_ptr(), None, y.data_ptr(), y.shape[1], *s)
        for x, p, y, s in zip(xs, pws, ys, shapes)])
    lib.bgl_linear_group.restype = None
    lib.bgl_linear_group(probs, ctypes.c_int64(len(shapes)), ctypes.c_int(pws[0].code), ctypes.c_int(2),
                         ctypes.c_int64(1), ctypes.c_int64(1))
    for x, p, y in zip(xs, pws, ys):
        assert torch.equal(y, linear_cpu.linear_packed(x, p))


def test_packing_rejects_what_it_cannot_lay_out(packed):
    if packed is torch.bfloat16:
        with pytest.raises(ValueError, match="even number of columns"):
            linear_cpu.pack_bf16(torch.zeros(4, 3, dtype=torch.bfloat16))
    other = torch.float32 if packed is torch.bfloat16 else torch.bfloat16
    pack = linear_cpu.pack_bf16 if packed is torch.bfloat16 else linear_cpu.pack_f32
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(4, 4, dtype=other))  # the other dtype
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(4, dtype=packed))
    pw = _pack(torch.zeros(4, 8, dtype=packed))
    with pytest.raises(ValueError, match="rows of 8"):
        linear_cpu.linear_packed(torch.zeros(2, 6), pw)
    with pytest.raises(ValueError, match="bias"):
        linear_cpu.linear_packed(torch.zeros(2, 8), pw, torch.zeros(5))


def test_the_platform_linear_takes_packed_weights(packed):
    """``ops.linear_packer`` (the engine's way in): repacks a weight for the CPU's ``linear``, which then takes
    it as ``w`` (bf16: with ``half_operands``); weights it cannot lay out come back as None."""
    from bagualu.ops import linear_packer

    pack = linear_packer("cpu")
    half = packed is torch.bfloat16
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(9, 64, generator=g), torch.randn(40, 64, generator=g).to(packed), torch.randn(40, generator=g)
    pw = pack(w, half)
    lin = kernel("linear", "cpu")
    torch.testing.assert_close(lin(x, pw, b, half_operands=half), lin(x, w, b, half_operands=half), rtol=1e-5, atol=1e-4)
    if half:
        with pytest.raises(ValueError, match="half_operands=True"):
            lin(x, pw, b)
        assert pack(w, False) is None  # bf16 weights without half operands: the row tiles widen them
        assert pack(torch.zeros(4, 5, dtype=torch.bfloat16), True) is None
    assert pack(torch.zeros(4, dtype=packed), half) is None
