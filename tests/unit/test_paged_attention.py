"""Paged-KV attention: reference vs scaled_dot_product_attention, the C++ kernel vs the reference, fallbacks.

Every batch is written into the cache with ``write_kv`` through shuffled block tables (padding entries are
garbage on purpose), while the oracle keeps each sequence's keys contiguous and calls SDPA directly.
"""

from __future__ import annotations

import ctypes
import logging
import random
import threading

import pytest
import torch
import torch.nn.functional as F

from bagualu.ops import kernel, native, paged_attention_cpu, paged_kv

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


class Batch:
    """A varlen batch: S sequences with context ``ctx[s]`` of which the last ``nq[s]`` positions are queries."""

    def __init__(self, ctx, nq, H, G, Dh, B, dtype, seed=0, extra_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.ctx, self.nq, self.H, self.G, self.Dh, self.B = list(ctx), list(nq), H, G, Dh, B
        nbs = [-(-c // B) for c in ctx]
        N = sum(nbs) + extra_blocks
        M = max(nbs) + 2
        perm = torch.randperm(N, generator=g)
        # padding entries point anywhere, even outside the cache: the kernel must not read them
        self.block_tables = torch.randint(-5, N + 5, (len(ctx), M), generator=g, dtype=torch.int32)
        self.k_cache = torch.full((N, G, B, Dh), float("nan"), dtype=dtype)  # unwritten slots are NaN
        self.v_cache = torch.full_like(self.k_cache, float("nan"))
        self.k_seq, self.v_seq = [], []
        used = 0
        for s, c in enumerate(ctx):
            self.block_tables[s, :nbs[s]] = perm[used:used + nbs[s]].int()
            used += nbs[s]
            k = torch.randn(c, G, Dh, generator=g).to(dtype)
            v = torch.randn(c, G, Dh, generator=g).to(dtype)
            j = torch.arange(c)
            slots = self.block_tables[s, j // B].long() * B + j % B
            paged_kv.write_kv(self.k_cache, self.v_cache, k, v, slots)
            self.k_seq.append(k)
            self.v_seq.append(v)
        self.context_lens = torch.tensor(ctx, dtype=torch.int32)
        self.qsl = torch.tensor([0] + list(torch.tensor(nq).cumsum(0).tolist()), dtype=torch.int32)
        self.q = torch.randn(int(self.qsl[-1]), H, Dh, generator=g).to(dtype)
        self.scale = Dh ** -0.5

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.qsl, self.scale)

    def oracle(self, window=None):
        """SDPA (fp32, GQA by enable_gqa) on each sequence's contiguous K/V with an explicit causal/window mask."""
        outs = []
        for s, (c, n) in enumerate(zip(self.ctx, self.nq)):
            q = self.q[int(self.qsl[s]):int(self.qsl[s + 1])].float().transpose(0, 1)  # [H, n, Dh]
            k = self.k_seq[s].float().transpose(0, 1)  # [G, c, Dh]
            v = self.v_seq[s].float().transpose(0, 1)
            p = torch.arange(c - n, c)[:, None]
            j = torch.arange(c)[None, :]
            mask = (j <= p) & ((j > p - window) if window is not None else True)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs).to(self.q.dtype)


def _ctx_lens(rng, n, B):
    """Random lengths in 1..600 plus the edges around block boundaries."""
    edges = [1, B - 1, B, B + 1, 2 * B, 600]
    return [rng.choice(edges) if rng.random() < 0.4 else rng.randint(1, 600) for _ in range(n)]


@pytest.fixture(scope="module")
def fast():
    k = paged_attention_cpu.kernel()
    if k is None:
        pytest.skip("the C++ kernel could not be built here (no compiler?); the fallback tests still run")
    return k


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than waking a team for every op (and keeps this file quick)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def two_threads(one_thread):
    torch.set_num_threads(2)  # the kernel's helper threads; the context split only happens with > 1 thread


# ---- write_kv and the reference -------------------------------------------------------------------------------

def test_write_kv_puts_each_token_in_its_slot():
    k_cache = torch.zeros(4, 2, 8, 3)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(3, 2, 3)
    v = torch.randn(3, 2, 3)
    slots = torch.tensor([0, 13, 31])
    kernel("write_kv")(k_cache, v_cache, k, v, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // 8, :, slot % 8], k[t]) and torch.equal(v_cache[slot // 8, :, slot % 8], v[t])
    assert int((k_cache != 0).sum()) == k.numel()
    with pytest.raises(ValueError, match="slot_mapping values must lie in"):
        paged_kv.write_kv(k_cache, v_cache, k, v, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="slot_mapping values must lie in"):
        paged_kv.write_kv(k_cache, v_cache, k, v, torch.tensor([0, 1, 32]))
    with pytest.raises(ValueError, match="must be \\[tokens=3, kv_heads=2, head_dim=3\\]"):
        paged_kv.write_kv(k_cache, v_cache, k[:, :1], v, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
def test_reference_matches_sdpa(dtype, window):
    b = Batch([5, 40, 17, 64], [1, 40, 3, 1], H=8, G=2, Dh=32, B=16, dtype=dtype, seed=1)
    ref = paged_kv.paged_attention(*b.args(), window)
    torch.testing.assert_close(ref, b.oracle(window), **TOL[dtype])


# ---- the C++ kernel vs the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,G", [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (12, 1), (12, 2), (12, 4)])
@pytest.mark.parametrize("Dh", [32, 64, 128])
@pytest.mark.parametrize("B", [16, 32])
def test_kernel_decode_matches_reference(fast, dtype, H, G, Dh, B):
    rng = random.Random(hash((H, G, Dh, B)) & 0xFFFF)
    ctx = _ctx_lens(rng, 4, B)
    b = Batch(ctx, [1] * len(ctx), H, G, Dh, B, dtype, seed=rng.randint(0, 999))
    torch.testing.assert_close(fast(*b.args()), paged_kv.paged_attention(*b.args()), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,G,Dh,B", [(12, 4, 64, 16), (8, 1, 128, 32), (4, 2, 32, 16)])
@pytest.mark.parametrize("window", [None, 1, 5, 64])
def test_kernel_mixed_prefill_decode_matches_reference(fast, dtype, H, G, Dh, B, window):
    # chunked prefill (rows that are not at the end of a long context), whole prompts, and decodes in one batch
    ctx, nq = [1, 33, 600, 250, 17, 100], [1, 33, 1, 57, 5, 100]
    b = Batch(ctx, nq, H, G, Dh, B, dtype, seed=7)
    ref = paged_kv.paged_attention(*b.args(), window)
    torch.testing.assert_close(fast(*b.args(), window), ref, **TOL[dtype])
    if dtype == torch.float32:  # and the reference against the independent oracle on the same batch
        torch.testing.assert_close(ref, b.oracle(window), **TOL[dtype])


@pytest.fixture(scope="module")
def rows_path():
    """The kernel built without its prefill tiles: prefill chunks on the decode path's row items."""
    lib = native.load("paged_attention_cpu_rows", "paged_attention_cpu.cpp", ("-DBGL_NO_TILES",))
    k = paged_attention_cpu.PagedAttentionKernel(lib)
    assert not k.prefill_tiles
    return k


@pytest.mark.parametrize("H,G,Dh,B", [(4, 4, 16, 16), (8, 4, 80, 32), (12, 4, 64, 16), (32, 4, 144, 48),
                                      (6, 1, 48, 16)])
@pytest.mark.parametrize("window", [None, 3, 40])
def test_prefill_tiles_match_reference(fast, rows_path, two_threads, H, G, Dh, B, window):
    """Prefill chunks (>= 4 query rows of a sequence: a chunk, or a speculative step's drafts) on the prefill tiles: 1, 2, 3, 8 and 6 heads per KV
    group (tiles of 96, 48, 32, 12 and 16 tokens), head dims whose 16-lane chunks leave 0, 1 and 3 behind the
    64-wide PV passes, whole prompts and chunks after a prefix around the tile and 32-key step edges, next to
    decode rows and short chunks (row items) in one batch; unwritten slots are NaN (padding keys must never
    reach the output). Against the reference, and not bit for bit the row path's output: the tiles ran."""
    if not fast.prefill_tiles:
        pytest.skip("this build has no prefill tiles (they need AVX-512)")
    ctx, nq = [8, 31, 33, 65, 150, 70, 300, 9, 40], [8, 31, 33, 65, 40, 16, 1, 3, 4]
    for dtype in (torch.float32, torch.bfloat16):
        b = Batch(ctx, nq, H, G, Dh, B, dtype, seed=H + Dh + B)
        ref = paged_kv.paged_attention(*b.args(), window)
        got = fast(*b.args(), window)
        torch.testing.assert_close(got, ref, **TOL[dtype])
        if dtype == torch.float32:
            rows = rows_path(*b.args(), window)
            torch.testing.assert_close(rows, ref, **TOL[dtype])
            assert not torch.equal(got, rows)  # another summation order: the tiles computed the chunks


def test_prefill_tiles_fp32_queries_over_bf16_cache(fast):
    b = Batch([100, 40], [100, 12], H=12, G=4, Dh=64, B=16, dtype=torch.bfloat16, seed=3)
    q32 = b.q.float()
    ref = paged_kv.paged_attention(q32, *b.args()[1:])
    torch.testing.assert_close(fast(q32, *b.args()[1:]), ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,window", [(4, None), (1, None), (2, 300)])
def test_kernel_batch1_long_context_split(fast, two_threads, dtype, G, window):
    # few (sequence, kv head) items and a long context: the kernel splits the context and merges slices
    b = Batch([3001], [1], H=8, G=G, Dh=64, B=16, dtype=dtype, seed=3)
    torch.testing.assert_close(fast(*b.args(), window), paged_kv.paged_attention(*b.args(), window), **TOL[dtype])
    b2 = Batch([2500, 9, 700], [1, 1, 4], H=8, G=G, Dh=64, B=32, dtype=dtype, seed=4)  # uneven lengths, split too
    torch.testing.assert_close(fast(*b2.args(), window), paged_kv.paged_attention(*b2.args(), window), **TOL[dtype])


def test_kernel_and_linear_share_helpers_across_python_threads(fast, two_threads):
    """The attention kernel posts to the linear kernel's helper pool (one set of helpers per process): calls
    of both from several Python threads at once (one holds the pool, the others run inline) stay exact."""
    import torch.nn.functional as F

    from bagualu.ops import kernel as op

    b = Batch([3001, 40], [1, 3], H=8, G=2, Dh=64, B=16, dtype=torch.float32, seed=8)
    want = paged_kv.paged_attention(*b.args())
    x, w = torch.randn(2, 512), torch.randn(4096, 512)
    want_lin = F.linear(x, w)
    bad = []

    def loop(i):
        for _ in range(20):
            if i % 2 and not torch.allclose(fast(*b.args()), want, **TOL[torch.float32]):
                bad.append(i)
            if not i % 2 and not torch.allclose(op("linear", "cpu")(x, w), want_lin, rtol=1e-5, atol=1e-4):
                bad.append(i)

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_kernel_out_buffer_and_strided_q(fast, two_threads):
    b = Batch([40, 300], [1, 6], H=12, G=4, Dh=64, B=16, dtype=torch.float32, seed=5)
    ref = paged_kv.paged_attention(*b.args())
    out = torch.full_like(b.q, float("nan"))
    assert fast(*b.args(), out=out) is out
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # q as the head slice of a fused qkv projection: token stride 3*H*Dh, taken without a copy
    qkv = torch.randn(b.q.shape[0], 3, 12 * 64)
    qkv[:, 0] = b.q.reshape(b.q.shape[0], -1)
    q_view = qkv[:, 0].view(-1, 12, 64)
    assert not q_view.is_contiguous()
    args = (q_view,) + b.args()[1:]
    torch.testing.assert_close(fast(*args), ref, **TOL[torch.float32])
    torch.testing.assert_close(paged_attention_cpu.paged_attention(*b.args(), out=out), ref, **TOL[torch.float32])


def test_kernel_mixed_dtypes_and_odd_head_dim(fast):
    # fp32 queries over a bf16 cache; Dh = 36 exercises the SIMD tails
    b = Batch([70, 5], [1, 2], H=6, G=3, Dh=36, B=16, dtype=torch.bfloat16, seed=6)
    q32 = b.q.float()
    ref = paged_kv.paged_attention(q32, *b.args()[1:])
    assert ref.dtype == torch.float32
    torch.testing.assert_close(fast(q32, *b.args()[1:]), ref, **TOL[torch.float32])
    b32 = Batch([70, 5], [1, 2], H=6, G=3, Dh=36, B=16, dtype=torch.float32, seed=6)
    torch.testing.assert_close(fast(*b32.args(), 9), paged_kv.paged_attention(*b32.args(), 9), **TOL[torch.float32])


@pytest.mark.parametrize("flag", [None, "-DBGL_NO_AVX512"])
@pytest.mark.parametrize("Dh", [16, 48, 112, 144])
def test_tiles_match_reference_for_every_group_size_and_width(fast, flag, Dh):
    """Head dims that fill 1..9 sixteen-lane chunks (the 512-bit tiles' full and remainder widths on AVX-512
    CPUs), GQA groups of 1, 2, 3, 4 and 6 heads, decode rows and prefill chunks; and the AVX2 build of the
    same kernel (what an AVX2-only CPU runs)."""
    k = fast if flag is None else paged_attention_cpu.PagedAttentionKernel(
        native.load("paged_attention_cpu_noavx512", "paged_attention_cpu.cpp", (flag,)))
    if flag is not None:
        assert k.simd_width in (8, 1)
    for H, G in ((4, 4), (4, 2), (6, 2), (8, 2), (6, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            b = Batch([37, 150], [1, 5], H=H, G=G, Dh=Dh, B=16, dtype=dtype, seed=Dh + H)
            torch.testing.assert_close(k(*b.args()), paged_kv.paged_attention(*b.args()), **TOL[dtype])


def test_scalar_build_matches_reference(fast):
    lib = native.load("paged_attention_cpu_scalar", "paged_attention_cpu.cpp", ("-DBGL_SCALAR",))
    scalar = paged_attention_cpu.PagedAttentionKernel(lib)
    assert scalar.simd_width == 1
    for dtype in (torch.float32, torch.bfloat16):
        b = Batch([1, 200, 77], [1, 9, 1], H=8, G=2, Dh=40, B=16, dtype=dtype, seed=8)
        torch.testing.assert_close(scalar(*b.args(), 50), paged_kv.paged_attention(*b.args(), 50), **TOL[dtype])


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_bad_index_tensors_raise_clear_errors(fast, impl):
    fn = paged_kv.paged_attention if impl == "reference" else fast
    b = Batch([20, 30], [1, 1], H=4, G=2, Dh=32, B=16, dtype=torch.float32, seed=9)
    q, k, v, bt, cl, qsl, scale = b.args()
    with pytest.raises((ValueError, IndexError)):
        bad = bt.clone()
        bad[1, 1] = k.shape[0]  # block id past the cache
        fn(q, k, v, bad, cl, qsl, scale)
    with pytest.raises(ValueError, match="context_len"):
        fn(q, k, v, bt, torch.tensor([20, 0], dtype=torch.int32), qsl, scale)
    with pytest.raises(ValueError, match="query_start_loc"):
        fn(q, k, v, bt, cl, torch.tensor([0, 1, 3], dtype=torch.int32), scale)
    with pytest.raises(TypeError, match="int32"):
        fn(q, k, v, bt.long(), cl, qsl, scale)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        fn(q[:, :3], k, v, bt, cl, qsl, scale)
    with pytest.raises(ValueError, match="window"):
        fn(q, k, v, bt, cl, qsl, scale, 0)


def test_fast_reports_the_bad_block_id(fast):
    b = Batch([20, 30], [1, 1], H=4, G=2, Dh=32, B=16, dtype=torch.float32, seed=9)
    q, k, v, bt, cl, qsl, scale = b.args()
    bad = bt.clone()
    bad[1, 1] = 999
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = 999 is not a block of the cache"):
        fast(q, k, v, bad, cl, qsl, scale)


# ---- resolution, build cache, fallback ------------------------------------------------------------------------

def test_registry_resolves_the_cpu_kernel():
    assert kernel("paged_attention") is paged_attention_cpu.paged_attention
    from bagualu.ops import decode_ops_cpu

    assert kernel("write_kv") is decode_ops_cpu.write_kv  # the reference outside inference mode


def test_fp16_cache_goes_to_the_reference():
    b = Batch([30], [2], H=4, G=2, Dh=32, B=16, dtype=torch.float16, seed=10)
    torch.testing.assert_close(kernel("paged_attention")(*b.args()), paged_kv.paged_attention(*b.args()))


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("BAGUALU_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()  # later tests load the real build again


@pytest.mark.parametrize("how", ["env", "bad_compiler"])
def test_fallback_to_reference_when_kernel_unavailable(fresh_loader, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("BAGUALU_NO_NATIVE", "1")
    else:
        monkeypatch.setenv("CXX", str(fresh_loader / "no-such-compiler"))
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("bagualu").addHandler(handler)
    try:
        b = Batch([50, 3], [1, 3], H=4, G=2, Dh=32, B=16, dtype=torch.float32, seed=11)
        out = torch.empty_like(b.q)
        for _ in range(2):
            got = kernel("paged_attention")(*b.args(), 4, out=out)
            assert got is out
            torch.testing.assert_close(got, b.oracle(4), **TOL[torch.float32])
        assert paged_attention_cpu.kernel() is None
    finally:
        logging.getLogger("bagualu").removeHandler(handler)
    assert len(warnings) == 1 and "reference" in warnings[0].getMessage()  # one warning, not one per call
    assert not list(fresh_loader.glob("kernels/*.so"))


def test_build_is_cached_and_safe_under_concurrent_builders(fresh_loader):
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    src = fresh_loader / "answer.cpp"
    src.write_text('extern "C" int bgl_answer() { return 42; }\n')
    paths, errors = [], []

    def build():
        try:
            paths.append(native.build("concurrent", src))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    (path,) = set(paths)
    assert path.parent == fresh_loader / "kernels" and not list(path.parent.glob("*.tmp*"))
    mtime = path.stat().st_mtime_ns
    assert native.build("concurrent", src) == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert ctypes.CDLL(str(path)).bgl_answer() == 42
    src.write_text('extern "C" int bgl_answer() { return 43; }\n')  # a new source is a new artefact
    assert native.build("concurrent", src) != path
