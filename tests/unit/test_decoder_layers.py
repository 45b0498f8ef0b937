"""``decoder_layers`` — a stack of decoder layers (MLP or MoE) over a paged KV cache as one operator: the CPU's native
driver (``ops/decoder_layers_cpu.py``) against the reference, which composes the platform's kernels from
Python. Hidden states and the KV written must agree; uncovered inputs fall back; bad indices raise before
anything is read. The engine-level tests (``test_engine_parity``) run Llama through it against transformers.
"""

from __future__ import annotations

import pytest
import torch

from bagualu.ops import decoder_layers_cpu, kernel
from bagualu.ops.decoder_layers import LayerWeights, LayerStack, MoEBlock, decoder_layers, moe_block

pytestmark = pytest.mark.unit

D, H, G, Dh, F, L, N, BS = 64, 4, 2, 16, 96, 3, 12, 16


@pytest.fixture(scope="module", autouse=True)
def built():
    if decoder_layers_cpu.driver() is None:
        pytest.skip("no C++ compiler: the reference is used")


def make_stack(wdtype=torch.float32, bias=False, window=None, seed=0, moe=None) -> LayerStack:
    """``moe``: None (all MLP layers) or the MoEBlock options of layers 1.. (layer 0 stays an MLP)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.2: (torch.randn(*s, generator=g) * sc).to(wdtype)  # noqa: E731
    f = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    b = lambda n: f(n) if bias else None  # noqa: E731
    Q = (H + 2 * G) * Dh
    layers = []
    for i in range(L):
        attn = (1 + f(D), r(Q, D), b(Q), r(D, H * Dh), b(D), 1 + f(D))
        w = window if i % 2 else None
        if moe is None or i == 0:
            layers.append(LayerWeights(*attn, r(2 * F, D), b(2 * F), r(D, F), b(D), w))
            continue
        E, Fe, Fs = moe.get("E", 6), moe.get("Fe", 40), moe.get("Fs", 0)
        gate = f if moe.get("fp32_gates") else r  # the router and shared gate kept in fp32 (engine, bf16 weights)
        shared = (r(2 * Fs, D), r(D, Fs), gate(1, D) if moe.get("shared_gate") else None) if Fs else (None,) * 3
        block = MoEBlock(gate(E, D) * 5 if gate is f else r(E, D, sc=1.0), r(E, Fe, D), r(E, Fe, D), r(E, D, Fe), moe.get("K", 2),
                         moe.get("router", "softmax_topk"), moe.get("norm", True), *shared)
        layers.append(LayerWeights(*attn, None, None, None, None, w, block))
    return LayerStack(tuple(layers), H, G, Dh, 1e-5, Dh**-0.5)


def make_step(kv_dtype=torch.float32, new=(1, 3), past=(20, 0), Dr=Dh, seed=1):
    """Sequences with ``past[s]`` keys already cached and ``new[s]`` tokens this step; random cache contents."""
    g = torch.Generator().manual_seed(seed)
    caches = [(torch.randn(N, G, BS, Dh, generator=g).to(kv_dtype), torch.randn(N, G, BS, Dh, generator=g).to(kv_dtype))
              for _ in range(L)]
    S, T = len(new), sum(new)
    bt = torch.tensor([[5, 2, 9, 1, 3], [7, 0, 11, 4, 6]][:S], dtype=torch.int32)
    ctx = torch.tensor([p + n for p, n in zip(past, new)], dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    slots = torch.tensor([int(bt[s, p // BS]) * BS + p % BS for s in range(S) for p in range(past[s], past[s] + new[s])])
    x = torch.randn(T, D, generator=g)
    cos, sin = torch.randn(T, Dr, generator=g), torch.randn(T, Dr, generator=g)
    return x, caches, cos, sin, bt, ctx, qsl, slots


def clone_caches(caches):
    return [(k.clone(), v.clone()) for k, v in caches]


def run_both(stack, step):
    x, caches, cos, sin, bt, ctx, qsl, slots = step
    c_ref, c_nat = clone_caches(caches), clone_caches(caches)
    with torch.inference_mode():
        want = decoder_layers(x, stack, c_ref, cos, sin, bt, ctx, qsl, slots)
        got = kernel("decoder_layers", "cpu")(x, stack, c_nat, cos, sin, bt, ctx, qsl, slots)
    return want, got, c_ref, c_nat


class CountingDriver:
    def __init__(self, drv):
        self.drv, self.calls = drv, 0
        self.kernels = drv.kernels

    def run(self, *a):
        self.calls += 1
        return self.drv.run(*a)

    def halves(self, *a):
        self.calls += 1
        return self.drv.halves(*a)

    def __getattr__(self, name):  # the rest of the driver as it is
        return getattr(self.drv, name)


@pytest.fixture
def counting(monkeypatch):
    c = CountingDriver(decoder_layers_cpu.driver())
    monkeypatch.setattr(decoder_layers_cpu, "_driver", c)
    return c


@pytest.mark.parametrize("wdtype,kv_dtype,bias,window,Dr", [
    (torch.float32, torch.float32, False, None, Dh),
    (torch.float32, torch.bfloat16, True, 8, Dh),
    (torch.bfloat16, torch.float32, True, None, 8),
    (torch.bfloat16, torch.bfloat16, False, 4, Dh),
])
def test_native_equals_reference(counting, wdtype, kv_dtype, bias, window, Dr):
    stack = make_stack(wdtype, bias, window)
    want, got, c_ref, c_nat = run_both(stack, make_step(kv_dtype, Dr=Dr))
    assert counting.calls == 1
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for (kr, vr), (kn, vn) in zip(c_ref, c_nat):  # this step's keys/values landed in the same slots
        torch.testing.assert_close(kn, kr, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(vn, vr, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("moe,wdtype,new", [
    (dict(), torch.float32, (1, 3)),                                              # Mixtral: renormalised top-2
    (dict(router="topk_softmax", K=3, E=8), torch.float32, (1,)),                 # batch-1 decode
    (dict(norm=False, Fs=24, shared_gate=True, K=4), torch.float32, (2, 5)),      # Qwen2-MoE: shared + gate
    (dict(Fs=16), torch.bfloat16, (1, 3)),
    (dict(Fs=16, shared_gate=True, fp32_gates=True), torch.bfloat16, (1, 3)),  # bf16 experts, fp32 gates
])
def test_moe_layers_native_equal_reference(counting, moe, wdtype, new):
    stack = make_stack(wdtype, bias=True, moe=moe, seed=5)
    want, got, c_ref, c_nat = run_both(stack, make_step(new=new, past=(20, 0)[:len(new)]))
    assert counting.calls == 1
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for (kr, vr), (kn, vn) in zip(c_ref, c_nat):
        torch.testing.assert_close(kn, kr, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("moe", [None, dict(Fs=16, shared_gate=True, fp32_gates=True)])
def test_half_operands_native_equal_reference(counting, moe, monkeypatch):
    """``half_operands``: every projection's input rounded to bf16 (vdpbf16ps on CPUs with AVX512-BF16,
    rounding then widening elsewhere) — native against the reference on torch's ops, and not the
    fp32-activation result."""
    import dataclasses

    from bagualu.ops import registry

    stack = make_stack(torch.bfloat16, bias=True, moe=moe, seed=7)
    half = dataclasses.replace(stack, half_operands=True, native={})
    x, caches, cos, sin, bt, ctx, qsl, slots = make_step(new=(5, 19), past=(20, 0))
    c_nat, c_ref = clone_caches(caches), clone_caches(caches)
    with torch.inference_mode():
        got = kernel("decoder_layers", "cpu")(x, half, c_nat, cos, sin, bt, ctx, qsl, slots)
        plain = kernel("decoder_layers", "cpu")(x, stack, clone_caches(caches), cos, sin, bt, ctx, qsl, slots)
        # the reference on torch's own ops (not the platform's kernels): rounding in torch, products in fp32
        monkeypatch.setattr(registry, "kernel", lambda op, platform=None: registry._REFERENCE[op])
        want = decoder_layers(x, half, c_ref, cos, sin, bt, ctx, qsl, slots)
    assert counting.calls == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for (kr, vr), (kn, vn) in zip(c_ref, c_nat):
        torch.testing.assert_close(kn, kr, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the rounding happened


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("moe", [None, dict(Fe=48, Fs=16, shared_gate=True, fp32_gates=True)])
def test_packed_projections_equal_unpacked(counting, wdtype, moe):
    """``packed_min_rows``: a step of that many tokens or more multiplies by repacked copies of the projections
    (bf16 with half operands on AVX512-BF16 builds, fp32 on AVX-512 ones) — in MoE layers the attention's, the
    shared experts' and those of every routed expert — the same products
    as the row tiles, summed in another order, so equal to rounding; a smaller step keeps the original
    weights, bit for bit. Elsewhere nothing is packed."""
    import dataclasses

    from bagualu.ops import linear_cpu

    stack = make_stack(wdtype, bias=True, seed=7, moe=moe)
    half = dataclasses.replace(stack, half_operands=wdtype is torch.bfloat16, native={})
    packed = dataclasses.replace(half, native={}, packed_min_rows=8)
    for new, exact in (((5, 19), False), ((2, 3), True)):
        x, caches, cos, sin, bt, ctx, qsl, slots = make_step(new=new, past=(20, 0))
        c_half, c_packed = clone_caches(caches), clone_caches(caches)
        with torch.inference_mode():
            want = kernel("decoder_layers", "cpu")(x, half, c_half, cos, sin, bt, ctx, qsl, slots)
            got = kernel("decoder_layers", "cpu")(x, packed, c_packed, cos, sin, bt, ctx, qsl, slots)
        table = packed.native["cpu"][1]
        assert (table[-1] is not None) == linear_cpu.packed_available(wdtype)
        if exact or table[-1] is None:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert not torch.equal(got, want)  # the packed tiles ran: another summation order
        for (kh, vh), (kp, vp) in zip(c_half, c_packed):
            torch.testing.assert_close(kp, kh, rtol=1e-4, atol=1e-4)
    assert counting.calls == 4


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_experts_with_few_rows_multiply_by_their_packed_copies(counting, wdtype):
    """In a step on the packed projections, an expert routed fewer rows than the step's threshold (here 9
    tokens x 2 routes over 6 experts: 1-5 rows each) multiplies by its packed copy too: with those copies
    zeroed, the MoE layers' outputs change; with the unpacked experts zeroed, nothing does."""
    import dataclasses

    from bagualu.ops import linear_cpu

    if not linear_cpu.packed_available(wdtype):
        pytest.skip(f"no packed {wdtype} tiles here")
    stack = make_stack(wdtype, bias=True, seed=5, moe={"Fe": 48})
    packed = dataclasses.replace(stack, half_operands=wdtype is torch.bfloat16, native={}, packed_min_rows=8)
    x, caches, cos, sin, bt, ctx, qsl, slots = make_step(new=(4, 5), past=(20, 0))
    c = clone_caches(caches)  # one set for every call: the table (and its packing) is built once per caches
    with torch.inference_mode():  # (each call writes the same keys and values into the same slots)
        want = kernel("decoder_layers", "cpu")(x, packed, c, cos, sin, bt, ctx, qsl, slots)
        E, Fe = 6, 48
        experts = [p for p in packed.native["cpu"][1][-1][1]
                   if isinstance(p, linear_cpu.PackedWeight) and p.N in (E * Fe, E * D)]
        assert len(experts) == 3 * sum(ly.moe is not None for ly in stack.layers)
        for ly in stack.layers:  # the unpacked experts: never read
            if ly.moe is not None:
                for w in (ly.moe.gate_w, ly.moe.up_w, ly.moe.down_w):
                    w.zero_()
        same = kernel("decoder_layers", "cpu")(x, packed, c, cos, sin, bt, ctx, qsl, slots)
        for p in experts:
            p.data.zero_()
        zeroed = kernel("decoder_layers", "cpu")(x, packed, c, cos, sin, bt, ctx, qsl, slots)
    assert torch.equal(same, want)
    assert not torch.allclose(zeroed, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("moe", [None, {"Fe": 48, "Fs": 16, "shared_gate": True, "fp32_gates": True}])
def test_steps_above_the_row_limit_multiply_by_the_packed_projections(counting, monkeypatch, moe):
    """A 150-token step of a stack with packed projections (fp32 weights on AVX-512 builds), the operator's
    row limit lowered to 100 (it is 256 there; a prefill chunk is up to 2048): above it the reference runs,
    with the projections' packed copies — an MoE layer's experts as per-expert views of the operator's
    packing, each multiplying the rows routed to it — equal to the unpacked reference to rounding."""
    import dataclasses

    from bagualu.ops import linear_cpu

    stack = make_stack(torch.float32, bias=True, seed=11, moe=moe)
    packed = dataclasses.replace(stack, native={}, packed_min_rows=8)
    x, caches, cos, sin, bt, ctx, qsl, slots = make_step(new=(70, 80), past=(10, 0))
    counting.max_rows_fp32 = 100
    calls = []
    real = linear_cpu.linear_packed
    monkeypatch.setattr(linear_cpu, "linear_packed",
                        lambda *a, **k: calls.append((a[0].shape[0], a[1].N, a[1].K)) or real(*a, **k))
    c_ref, c_pk = clone_caches(caches), clone_caches(caches)
    with torch.inference_mode():
        want = decoder_layers(x, stack, c_ref, cos, sin, bt, ctx, qsl, slots)
        got = kernel("decoder_layers", "cpu")(x, packed, c_pk, cos, sin, bt, ctx, qsl, slots)
    assert counting.calls == 0
    if not linear_cpu.packed_available(torch.float32):
        assert calls == []
    else:
        Fe = moe["Fe"] if moe else None
        dense = [c for c in calls if Fe not in c[1:]]
        # qkv and o, and an MLP's gate/up and down or the shared experts' two, each over all 150 rows
        assert [c[0] for c in dense] == [150] * 4 * L
        if moe:
            n_moe = sum(ly.moe is not None for ly in stack.layers)
            gate_up, down = [c for c in calls if c[1:] == (Fe, D)], [c for c in calls if c[1:] == (D, Fe)]
            # every token's K routes: gate and up rows, then as many down rows
            assert sum(c[0] for c in gate_up) == 2 * 150 * moe.get("K", 2) * n_moe
            assert sum(c[0] for c in down) == 150 * moe.get("K", 2) * n_moe
            assert len(dense) + len(gate_up) + len(down) == len(calls)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for (kr, vr), (kp, vp) in zip(c_ref, c_pk):
        torch.testing.assert_close(kp, kr, rtol=1e-4, atol=1e-4)


def test_many_rows_with_fp32_weights(counting):
    """A 130-token step with fp32 weights (a batch-130 decode, or a prefill chunk): the native call where the
    linear kernel hands many-row calls to the grouped GEMM (AVX-512 builds), the reference elsewhere; the same
    result either way."""
    from bagualu.ops import gemm_cpu

    stack = make_stack(torch.float32, bias=True, seed=9)
    want, got, c_ref, c_nat = run_both(stack, make_step(new=(50, 80), past=(20, 0)))
    assert counting.calls == (1 if gemm_cpu.linear_handoff_rows() else 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for (kr, vr), (kn, vn) in zip(c_ref, c_nat):
        torch.testing.assert_close(kn, kr, rtol=1e-4, atol=1e-4)


def halves_then_attention(stack, step, halves):
    """The stack as the R-workers' runner drives it: ``halves`` (the S-part) around attention over the caches
    computed apart, as a worker would (with the CPU's kernels), per layer. Returns the final x."""
    write_kv, attend = kernel("write_kv", "cpu"), kernel("paged_attention", "cpu")
    x, caches, cos, sin, bt, ctx, qsl, slots = step
    x = x.clone()
    o = None
    for layer in range(-1, L):
        post, pre = (None if layer < 0 else layer), (layer + 1 if layer + 1 < L else None)
        x, q, k, v = halves(x, stack, post, o, pre, cos, sin)
        if pre is not None:
            k_cache, v_cache = caches[pre]
            write_kv(k_cache, v_cache, k, v, slots)
            o = attend(q, k_cache, v_cache, bt, ctx, qsl, stack.scale, stack.layers[pre].window)
    return x


@pytest.mark.parametrize("wdtype,moe,half,packed", [
    (torch.float32, None, False, 0),
    (torch.bfloat16, None, False, 0),
    (torch.bfloat16, dict(Fs=16, shared_gate=True, fp32_gates=True), True, 0),
    (torch.bfloat16, dict(Fe=48, Fs=16, shared_gate=True, fp32_gates=True), True, 1),
    (torch.float32, dict(Fe=48, norm=False, K=3), False, 8),
])
def test_layer_halves_compose_to_the_operator(counting, wdtype, moe, half, packed):
    """``decoder_layer_halves`` — the S-part around attention computed elsewhere, as FastDecode's R-workers
    need it — natively (one call per layer boundary) and as the reference, composed with attention computed
    apart, equals the whole operator: the same hidden states and the same keys and values written. With
    ``packed_min_rows`` the halves multiply by the stack's packed projections as the operator does."""
    import dataclasses

    from bagualu.ops.decoder_layers import decoder_layer_halves

    stack = dataclasses.replace(make_stack(wdtype, bias=True, moe=moe, seed=13), half_operands=half,
                                packed_min_rows=packed)
    step = make_step(new=(9, 3), past=(20, 0), Dr=8)
    x, caches, cos, sin, bt, ctx, qsl, slots = step
    c_op, c_nat, c_ref = clone_caches(caches), clone_caches(caches), clone_caches(caches)
    with torch.inference_mode():
        want = kernel("decoder_layers", "cpu")(x, stack, c_op, cos, sin, bt, ctx, qsl, slots)
        counting.calls = 0
        got = halves_then_attention(stack, (x, c_nat, *step[2:]), kernel("decoder_layer_halves", "cpu"))
        assert counting.calls == L + 1
        ref = halves_then_attention(stack, (x, c_ref, *step[2:]), decoder_layer_halves)
    assert counting.calls == L + 1
    tol = dict(rtol=1e-4, atol=1e-4) if half or packed else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ref, want, **tol)
    assert torch.equal(got, want)  # natively the same kernels on the same weights in the same order: bit for bit
    for (ko, vo), (kn, vn) in zip(c_op, c_nat):
        assert torch.equal(kn, ko) and torch.equal(vn, vo)


def test_layer_halves_uncovered_inputs_take_the_reference(counting):
    """Outside inference mode, with bf16 activations, or an output of another dtype: the reference, the same
    result."""
    from bagualu.ops.decoder_layers import decoder_layer_halves

    stack = make_stack(seed=2)
    x, _, cos, sin, *_ = make_step(new=(2, 3))
    o = torch.randn(5, H, Dh)
    want = decoder_layer_halves(x.clone(), stack, 1, o, 2, cos, sin)
    got = kernel("decoder_layer_halves", "cpu")(x.clone(), stack, 1, o, 2, cos, sin)
    with torch.inference_mode():
        got_bf16_o = kernel("decoder_layer_halves", "cpu")(x.clone(), stack, 1, o.bfloat16(), 2, cos, sin)
        want_bf16_o = decoder_layer_halves(x.clone(), stack, 1, o.bfloat16(), 2, cos, sin)
        native = kernel("decoder_layer_halves", "cpu")(x.clone(), stack, 1, o, 2, cos, sin)
    assert counting.calls == 1
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_bf16_o, want_bf16_o):
        assert torch.equal(a, b)
    for a, b in zip(native, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_moe_reference_is_the_moe_layer():
    """The operator's MoE block computes what ``bagualu.moe.MoE`` computes for inference."""
    from bagualu.engine.runner import _moe_block
    from bagualu.moe import MoE

    torch.manual_seed(0)
    for kw in (dict(router="softmax_topk"), dict(router="topk_softmax"),
               dict(router="softmax_topk", norm_topk_prob=False, num_shared_experts=1, shared_expert_gate=True)):
        m = MoE(D, 40, 6, 2, **kw).eval()
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        m.fuse_projections() if hasattr(m, "fuse_projections") else None
        if m.shared_experts is not None:
            m.shared_experts.fuse_projections()
        h = torch.randn(5, D)
        with torch.inference_mode():
            want = m(h)
            got = moe_block(h, _moe_block(m))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_rows_one_by_one_match_a_batch(counting):
    """Three decode steps through the native path equal one step that prefills the same tokens."""
    stack = make_stack(seed=3)
    x, caches, cos, sin, bt, ctx, qsl, slots = make_step(new=(3,), past=(0,), seed=4)
    with torch.inference_mode():
        whole = kernel("decoder_layers", "cpu")(x, stack, clone_caches(caches), cos, sin, bt, ctx, qsl, slots)
        c = clone_caches(caches)
        rows = [kernel("decoder_layers", "cpu")(x[i:i + 1], stack, c, cos[i:i + 1], sin[i:i + 1], bt,
                                              torch.tensor([i + 1], dtype=torch.int32),
                                              torch.tensor([0, 1], dtype=torch.int32), slots[i:i + 1]) for i in range(3)]
    assert counting.calls == 4
    torch.testing.assert_close(torch.cat(rows), whole, rtol=2e-5, atol=2e-5)


def test_uncovered_inputs_take_the_reference(counting):
    stack = make_stack()
    step = make_step()
    x, caches, cos, sin, bt, ctx, qsl, slots = step
    counting.max_rows_fp32 = 64  # as on an AVX2 build, where the linear kernel hands nothing to the GEMM
    with torch.inference_mode():  # fp32 weights and more rows than the GEMV kernel takes: the BLAS path
        big = make_step(new=(70,), past=(0,))
        kernel("decoder_layers", "cpu")(*big[:1], stack, *big[1:])
    got = kernel("decoder_layers", "cpu")(x, stack, clone_caches(caches), cos, sin, bt, ctx, qsl, slots)  # no inference mode
    assert counting.calls == 0
    want, *_ = run_both(stack, step)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_bad_indices_raise_before_reading_the_cache():
    """A slot outside the cache: nothing is written. A block table naming no block: attention refuses
    before it reads; only the first layer's KV write (which precedes it, as on the per-layer path) happened."""
    stack = make_stack()
    x, caches, cos, sin, bt, ctx, qsl, slots = make_step()
    c = clone_caches(caches)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="slot_mapping values must lie"):
            kernel("decoder_layers", "cpu")(x, stack, c, cos, sin, bt, ctx, qsl, slots + N * BS)
        assert all(torch.equal(a, b) and torch.equal(u, v) for (a, u), (b, v) in zip(caches, c))
        bad = bt.clone()
        bad[1, 0] = N + 3
        with pytest.raises(ValueError, match="is not a block of the cache"):
            kernel("decoder_layers", "cpu")(x, stack, c, cos, sin, bad, ctx, qsl, slots)
    assert all(torch.equal(a, b) and torch.equal(u, v) for (a, u), (b, v) in zip(caches[1:], c[1:]))
