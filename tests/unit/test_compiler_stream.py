"""Streamed (non-temporal) stores in the C code generator: chosen for kernels that move more than the
last-level cache, and bit-identical to cached stores. The cache size is patched small here, so the
kernels of these small tests take the path that large ones take."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from bagualu.compiler import cost, search
from bagualu.compiler import graph as G
from bagualu.compiler.codegen import cpu

pytestmark = pytest.mark.usefixtures("powerfusion_env")


def rmsnorm(x, r, w):
    h = x + r
    hf = h.float()
    return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def softmax_t(x):
    return torch.softmax(x, -1).transpose(0, 1).contiguous()  # a transposing store: not contiguous, not streamed


CASES = {
    # odd widths: chunks end mid-vector, rows start at unaligned addresses
    "softmax": (lambda x: torch.softmax(x * 1.5, -1), lambda dt: [torch.randn(5, 1037).to(dt)]),
    "rmsnorm": (rmsnorm, lambda dt: [torch.randn(6, 515).to(dt), torch.randn(6, 515).to(dt), torch.randn(515).to(dt)]),
    "swiglu": (lambda g, u: F.silu(g) * u, lambda dt: [torch.randn(3, 7, 601).to(dt), torch.randn(3, 7, 601).to(dt)]),
    "softmax_t": (softmax_t, lambda dt: [torch.randn(9, 700).to(dt)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_stores_equal_cached_stores_and_eager(case, dtype, compile_streamed):
    fn, make = CASES[case]
    torch.manual_seed(0)
    args = make(dtype)
    plain, plain_kernels = compile_streamed(fn, args, False)
    streamed, kernels = compile_streamed(fn, args, True)
    plain_keys, keys = [k.mapping for k in plain_kernels], [k.mapping for k in kernels]
    assert keys and all(k.endswith("/nt") for k in keys), keys
    assert not any(k.endswith("/nt") for k in plain_keys), plain_keys
    eager = fn(*args)
    plain, streamed, eager = [o if isinstance(o, tuple) else (o,) for o in (plain, streamed, eager)]
    for p, s, e in zip(plain, streamed, eager):
        # where a value is stored does not change it; strip-mining a pass that also reduces changes the
        # summation order of that reduction (as the prefetching mapping does), so: equal up to rounding
        if case == "swiglu":
            assert torch.equal(p, s)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(s, p, **tol)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, e, **tol)


def test_streamed_source_stages_long_contiguous_stores_only():
    torch._dynamo.reset()
    start = G.SEQ[0]
    x = torch.randn(9, 700)
    f = torch.compile(lambda x: (torch.softmax(x, -1), torch.stack([x * 2, x + 1], -1)), backend="powerfusion")
    f(x)
    kernels = [k.kernel for r in G.REPORTS if r.seq >= start for k in r.kernels]
    assert len(kernels) == 1 and len(kernels[0].outputs) == 2  # one multi-output kernel
    src = cpu.CppCodegen().source([(kernels[0], cpu.Mapping(stream=True))])
    body = src.split(f"int64_t {kernels[0].name}(", 1)[1]
    soft, stack = (0, 1) if kernels[0].outputs[0].shape == (9, 700) else (1, 0)
    # softmax rows of 700: staged in chunks, copied out non-temporally, fenced before the region ends
    assert f"pf_stream(&out{soft}[" in body and "pf_sfence();" in body
    # stack's innermost loops store one element each: plain stores
    assert f"pf_stream(&out{stack}" not in body and f"out{stack}[" in body


def _softmax_kernel():
    torch._dynamo.reset()
    start = G.SEQ[0]
    torch.compile(lambda x: torch.softmax(x, -1), backend="powerfusion")(torch.randn(64, 512))
    return next(kr.kernel for r in G.REPORTS if r.seq >= start for kr in r.kernels)


def test_candidates_stream_only_above_the_last_level_cache(monkeypatch):
    k = _softmax_kernel()
    gen = cpu.CppCodegen()
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 64 * 512 * 8 + 1)  # traffic is 64*512*8 bytes
    assert not any(m.stream for m in gen.candidates(k))
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 64 * 512 * 8 - 1)
    assert any(m.stream for m in gen.candidates(k)) and any(not m.stream for m in gen.candidates(k))
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 0)  # unknown: never
    assert not any(m.stream for m in gen.candidates(k))


def test_dynamic_batch_mode_never_streams(monkeypatch):
    """Planned at huge sentinel sizes, a dynamic-batch kernel serves small token counts too, whose outputs the
    next operator should find in the cache: no streamed stores, and explain says so."""
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 1024)
    monkeypatch.setattr(cost, "STREAM_OPS", 0)
    torch._dynamo.reset()
    start = G.SEQ[0]
    fn = torch.compile(lambda x: torch.softmax(x * 2, -1), backend="powerfusion", options={"dynamic_batch": True})
    for i, t in enumerate((5, 9, 17)):
        x = torch.randn(t, 300)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(fn(x), torch.softmax(x * 2, -1), atol=1e-6, rtol=1e-5)
    reports = [r for r in G.REPORTS if r.seq >= start]
    assert len(reports) == 1 and "dynamic batch" in reports[0].label
    assert reports[0].kernels and not any(k.mapping.endswith("/nt") for k in reports[0].kernels)


def test_reduction_lanes_follow_the_cpu(monkeypatch):
    """simdlen is two of the CPU's widest vectors: 16 fp32 lanes on AVX2, 32 on AVX-512 (where GCC builds
    simdlen(16) from 256-bit registers), and the generated loops say so."""
    k = _softmax_kernel()
    for cap, lanes in (("AVX2", 16), ("AVX512", 32)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda cap=cap: cap)
        cpu.simd_lanes.cache_clear()
        vecs = {m.vector for m in cpu.CppCodegen().candidates(k)}
        assert vecs == {0, lanes}
        src = cpu.CppCodegen().source([(k, next(m for m in cpu.CppCodegen().candidates(k) if m.vector))])
        assert f"simdlen({lanes})" in src
    cpu.simd_lanes.cache_clear()


def test_a_measured_mapping_no_longer_offered_is_decided_again(monkeypatch, tmp_path):
    k = _softmax_kernel()
    gen = cpu.CppCodegen()
    monkeypatch.setattr(search, "_decision_dir", lambda: tmp_path)
    offered = gen.candidates(k)[0]
    gone = dataclasses.replace(offered, vector=12)  # e.g. a lane count an older build offered
    for m, source in ((offered, "cache"), (gone, "model")):
        search._save(search._key(k, gen.name), {"mapping": search._to_json(m), "source": "measured", "measured_s": 1e-3})
        choice = search.choose(k, gen)
        assert choice.source == source and (choice.mapping.key() == m.key()) == (source == "cache")


def test_autotuning_measures_real_kernels_inside_the_trace(monkeypatch, tmp_path):
    """``BAGUALU_COMPILER_AUTOTUNE=1``: the candidates are timed on real inputs while AOTAutograd traces under
    fake tensors, the measured choice is cached on disk, and the compiled function equals eager."""
    monkeypatch.setenv("BAGUALU_COMPILER_AUTOTUNE", "1")
    monkeypatch.setattr(search, "_decision_dir", lambda: tmp_path)
    torch._dynamo.reset()
    x = torch.randn(64, 700)
    fn = torch.compile(lambda t: torch.softmax(t * 2, -1), backend="powerfusion")
    torch.testing.assert_close(fn(x), torch.softmax(x * 2, -1))
    decisions = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert decisions and all(d["source"] == "measured" and d["measured_s"] > 0 for d in decisions)
