"""The engine's greedy tokens equal transformers' ``generate``, token for token (fp32).

Mixed prompt lengths in one batch, prompts that share prefixes, and every engine mode that changes the
data path: prefix caching on/off, chunked prefill (a tiny token budget), preemption by recompute
(a tiny KV cache), steady admission. Public API only: ``bagualu.LLM`` on a Hugging Face directory.
"""

import pytest
import torch

import bagualu
from hf_models import hf_configs, make_hf_model, save_hf_model
from bagualu.models.byte_tokenizer import byte_level_tokenizer
from bagualu.moe.experts import gemm_via_fp32
from bagualu.engine import runner as runner_mod
from bagualu.ops import linear_cpu, linear_half_operand_dtypes, linear_weight_dtypes
from bagualu.platform import current_platform

MAX_NEW = 12
ARCHS = ["llama", "mixtral", "qwen2_moe", "mixtral-sliding"]


def prompts():
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 256, (37,), generator=g).tolist()
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 33, 1, 48)]
    return ps + [shared + [7, 8], shared + [9], shared[:32]]


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = save_hf_model(hf_configs()[name], path)
    byte_level_tokenizer().save(path)
    refs = []
    for p in prompts():
        out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)
        refs.append(out[0, len(p):].tolist())
    return path, refs


MODES = {
    "default": dict(),
    "unpacked": dict(packed_weights=False),
    "per-layer-loop": dict(fused_layers=False),
    "no-prefix-cache": dict(prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=6, block_size=16),
    "steady": dict(admission="steady", num_kv_blocks=8),
    # two micro-batches ping-pong between the S-part and the workers (the default with the S-part on an
    # accelerator; on CPU, one, as in the other R-worker modes)
    "r-workers": dict(r_workers=2, micro_batches=2),
    "r-workers-per-layer-loop": dict(r_workers=2, micro_batches=2, fused_layers=False),
    "r-workers-preemption": dict(r_workers=2, admission="greedy", num_kv_blocks=4, max_num_batched_tokens=32),
    # prompt-lookup speculation (one-token suffixes too, so random models' repetitive outputs draft a lot)
    "speculative": dict(speculative_tokens=4, prompt_lookup_min=1),
    "speculative-chunked-preemption": dict(speculative_tokens=3, prompt_lookup_min=1, num_kv_blocks=6,
                                           max_num_batched_tokens=20),
    "r-workers-speculative": dict(r_workers=2, speculative_tokens=4, prompt_lookup_min=1),
}


# every mode on llama; the other architectures (MoE, sliding window) in the default and preemption modes
CASES = [("llama", m) for m in MODES] + [(a, m) for a in ARCHS[1:] for m in ("default", "preemption")] + [
    ("mixtral-sliding", "r-workers"), ("mixtral", "speculative"), ("qwen2_moe", "speculative")]


@pytest.mark.parametrize("case,mode", CASES, indirect=["case"])
def test_greedy_equals_transformers(case, mode):
    path, refs = case
    llm = bagualu.LLM(str(path), **MODES[mode])
    r = llm.engine.runner
    halves, run_halves = [], r.halves
    r.halves = lambda *a: halves.append(a[0].shape[0]) or run_halves(*a)
    params = bagualu.SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    m = llm.engine.metrics
    if mode.endswith("preemption"):
        assert m.preemptions > 0
    if "speculative" in mode:  # drafts were computed, and some accepted (else this would test nothing)
        assert m.spec_accepted_tokens > 0 and m.spec_draft_tokens > m.spec_accepted_tokens
    if mode == "default":  # a second round finds the first round's blocks in the prefix cache
        before = llm.engine.kv.hit_tokens
        again = llm.generate(prompts()[-3:], params, use_tqdm=False)
        assert [o.token_ids for o in again] == refs[-3:]
        assert llm.engine.kv.hit_tokens - before == 32 + 32 + 16  # full 16-token blocks, last token recomputed
    # the layers run as the decoder_layers operator (one native call per step on CPU) unless asked not to; every
    # architecture here is covered (GQA, SwiGLU or MoE with a plain top-k router). With attention in R-workers,
    # as the operator's halves around it: per micro-batch, one call before layer 0 and one after each layer
    assert (r.stack is not None) == (not mode.endswith("per-layer-loop"))
    assert bool(halves) == (mode.startswith("r-workers") and r.stack is not None)
    if halves:
        assert len(halves) % (len(r.layers) + 1) == 0
    if mode == "no-prefix-cache":
        assert llm.engine.kv.prefix_hit_rate() == 0
    # fp32 weights: steps of >= PACKED_MIN_ROWS tokens multiply by repacked copies where the CPU has the tiles
    packs = mode != "unpacked" and linear_cpu.packed_available(torch.float32)
    assert (llm.engine.runner.head_packed is not None) == packs
    if llm.engine.runner.stack is not None and llm.engine.runner.stack.layers[0].qkv_w.dtype is not torch.bfloat16:
        assert llm.engine.runner.stack.packed_min_rows == (0 if mode == "unpacked" else runner_mod.PACKED_MIN_ROWS)
    assert m.num_running == 0 and m.kv_usage == 0
    if mode.startswith("r-workers"):
        assert llm.engine.config.attention_mode == "r_workers" and len(llm.engine.kv.pools) == 2
        assert llm.engine.num_micro_batches == MODES[mode].get("micro_batches", 1)
        assert all(p.num_used == 0 for p in llm.engine.kv.pools)
    llm.close()


@pytest.fixture(scope="module")
def bf16_case(request, tmp_path_factory):
    """A bf16 checkpoint, and transformers' greedy tokens for it computed in fp32 (its values are exact there)."""
    name = request.param
    path = tmp_path_factory.mktemp(name + "-bf16")
    hf = make_hf_model(hf_configs()[name]).to(torch.bfloat16)
    hf.save_pretrained(path)
    byte_level_tokenizer().save(path)
    hf = hf.float()
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)[0, len(p):]
            .tolist() for p in prompts()]
    return path, refs


BF16_MODES = {"default": dict(), "per-layer-loop": dict(fused_layers=False), "r-workers": dict(r_workers=2),
              "r-workers-per-layer-loop": dict(r_workers=2, fused_layers=False),
              "widened-fp32": dict(gemm_dtype="float32")}


def _bf16_speed(monkeypatch, factor: float):
    """The platform's bf16 GEMMs measured at ``factor`` times its fp32 rate, whatever this machine has: the
    decisions that follow from it (``gemm_via_fp32``) are cached, so they are cleared before and after."""
    plat = current_platform()  # a Platform class
    fp32 = plat.peak_flops(torch.float32)
    monkeypatch.setattr(plat, "peak_flops", classmethod(lambda cls, dt: fp32 * factor if dt is torch.bfloat16 else fp32))
    gemm_via_fp32.cache_clear()
    yield
    monkeypatch.undo()
    gemm_via_fp32.cache_clear()


@pytest.fixture
def slow_bf16_platform(monkeypatch):
    """The platform as a CPU without bf16 units sees itself (bf16 GEMMs far slower than fp32)."""
    yield from _bf16_speed(monkeypatch, 1 / 100)


@pytest.mark.parametrize("bf16_case,mode", [("llama", m) for m in BF16_MODES] + [
    ("mixtral", "default"), ("mixtral", "per-layer-loop"), ("qwen2_moe", "default")], indirect=["bf16_case"])
def test_bf16_checkpoint_keeps_bf16_projections(bf16_case, mode, monkeypatch, slow_bf16_platform):
    """A bf16 model on a platform whose bf16 GEMMs are slower than fp32 runs its activations in fp32 and, where
    the platform's ``linear`` reads bf16 weights as stored, keeps every projection in bf16 (half the bytes a
    decode step streams; embeddings, norms and routers in fp32): the model transformers computes in fp32 on
    the same values, token for token. Steps of more than ``MAX_ROWS_BF16`` tokens (here 16: the prefill)
    widen the weights for the BLAS GEMM; decode steps read them as bf16. (On a CPU with bf16 units the
    model runs in bf16; the fixture makes this one look like a CPU without them.)"""
    path, refs = bf16_case
    monkeypatch.setattr(linear_cpu, "MAX_ROWS_BF16", 16)
    llm = bagualu.LLM(str(path), dtype="bfloat16", kv_cache_dtype="float32", **BF16_MODES[mode])
    slow = gemm_via_fp32(torch.bfloat16, "cpu")
    narrow = slow and mode != "widened-fp32" and torch.bfloat16 in linear_weight_dtypes()
    m = llm.engine.model
    assert m.dtype == (torch.float32 if slow else torch.bfloat16)
    proj = torch.bfloat16 if narrow or not slow else torch.float32
    layers = m.model.layers
    weights = [m.lm_head.weight, layers[0].self_attn.qkv_weight, layers[0].self_attn.q_proj.weight,
               layers[-1].self_attn.o_proj.weight]
    if hasattr(layers[-1].mlp, "experts"):
        moe = layers[-1].mlp
        weights += [moe.experts.gate_proj, moe.experts.down_proj]
        assert moe.gate.weight.dtype == m.dtype  # routers keep the activations' dtype
        if moe.shared_experts is not None:
            weights += [moe.shared_experts.gate_up_weight, moe.shared_experts.down_proj.weight]
    else:
        weights += [layers[0].mlp.gate_up_weight, layers[0].mlp.down_proj.weight]
    assert [w.dtype for w in weights] == [proj] * len(weights)
    assert layers[0].self_attn.q_proj.weight.data_ptr() == layers[0].self_attn.qkv_weight.data_ptr()  # a view
    params = bagualu.SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    llm.close()


@pytest.fixture
def fast_bf16_platform(monkeypatch):
    """The platform as a CPU with bf16 units sees itself (bf16 GEMMs faster than fp32)."""
    yield from _bf16_speed(monkeypatch, 4)


def record_stacks(monkeypatch, llm, seen: list) -> None:
    """Append (tokens, activation dtype, half operands) for every micro-batch step the layer operator runs: in
    process (``run_layers``) or as its halves around R-workers' attention (their first call of a step)."""
    r = llm.engine.runner
    if r.in_process_layers:
        run_layers = r.backend.run_layers
        monkeypatch.setattr(r.backend, "run_layers", lambda i, stack, x, *a: seen.append(
            (x.shape[0], x.dtype, stack.half_operands)) or run_layers(i, stack, x, *a))
    else:
        halves = r.halves
        monkeypatch.setattr(r, "halves", lambda x, stack, post, *a: (post is None and seen.append(
            (x.shape[0], x.dtype, stack.half_operands))) or halves(x, stack, post, *a))


@pytest.mark.parametrize("bf16_case,mode", [("llama", "default"), ("mixtral", "default"), ("qwen2_moe", "default"),
                                             ("llama", "r-workers"), ("qwen2_moe", "r-workers")],
                         indirect=["bf16_case"])
def test_bf16_model_small_steps_run_fp32_activations(bf16_case, mode, monkeypatch, fast_bf16_platform):
    """A bf16 model on a platform with fast bf16 GEMMs runs in bf16, except that a step of at most
    ``FP32_ACTIVATION_ROWS`` tokens runs the layer operator with fp32 activations over the same bf16 weights
    (the decode GEMV reads them as stored). With every step that small (a 16-token budget) the engine computes
    what transformers computes in fp32 on the checkpoint's values, token for token. Larger steps run with half
    operands where the platform multiplies them natively (see the next test), else in bf16. (A platform that
    multiplies them on a matrix unit runs every step so: test_bf16_model_mid_steps_round_projection_inputs; here
    the policy of one without, on any CPU.) With attention in R-workers the operator's halves run the same
    policy around it (the workers then exchange fp32 q, k, v and outputs)."""
    from bagualu.engine import core, runner

    if torch.bfloat16 not in linear_weight_dtypes():
        pytest.skip("the platform's linear does not read bf16 weights (no C++ compiler)")
    path, refs = bf16_case
    monkeypatch.setattr(core, "FP32_ACTIVATION_ROWS", 16)
    monkeypatch.setattr(runner, "linear_matrix_unit_dtypes", lambda: ())
    seen = []
    params = bagualu.SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    llm = bagualu.LLM(str(path), dtype="bfloat16", kv_cache_dtype="float32", max_num_batched_tokens=16,
                      **BF16_MODES[mode])
    assert llm.engine.model.dtype == torch.bfloat16 and llm.engine.runner.wide is not None
    record_stacks(monkeypatch, llm, seen)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    assert seen and all(dt == torch.float32 and not half for _, dt, half in seen)
    llm.close()
    seen.clear()
    # prefill steps above 16 tokens
    llm = bagualu.LLM(str(path), dtype="bfloat16", max_num_batched_tokens=64, **BF16_MODES[mode])
    record_stacks(monkeypatch, llm, seen)
    llm.generate(prompts()[:4], params, use_tqdm=False)
    native_half = llm.engine.runner.half is not None
    assert native_half == (torch.bfloat16 in linear_half_operand_dtypes())
    above = {(dt, half) for n, dt, half in seen if n > 16}
    assert above == ({(torch.float32, True)} if native_half else {(torch.bfloat16, False)})
    assert {(dt, half) for n, dt, half in seen if n <= 16} == {(torch.float32, False)}
    llm.close()
    llm = bagualu.LLM(str(path), dtype="bfloat16", gemm_dtype="model")
    assert llm.engine.runner.wide is None and llm.engine.runner.half is None  # always bf16
    llm.close()


@pytest.mark.parametrize("bf16_case,mode", [("llama", "per-layer-loop"), ("llama", "r-workers-per-layer-loop"),
                                             ("mixtral", "per-layer-loop"), ("qwen2_moe", "per-layer-loop"),
                                             ("qwen2_moe", "r-workers-per-layer-loop")], indirect=["bf16_case"])
def test_bf16_model_small_steps_without_the_operator_run_fp32_activations(bf16_case, mode, monkeypatch,
                                                                          fast_bf16_platform):
    """Without the layer operator (the per-layer loop; with attention in process or in R-workers, which then
    exchange fp32 q, k, v and outputs) a bf16 model's steps of at most ``FP32_ACTIVATION_ROWS`` tokens call its own modules with fp32
    activations over the bf16 weights (routers and Qwen2-MoE's shared-expert gate through the platform's
    ``linear`` too): what transformers computes in fp32 on the checkpoint's values, token for token."""
    from bagualu.engine import core

    if torch.bfloat16 not in linear_weight_dtypes():
        pytest.skip("the platform's linear does not read bf16 weights (no C++ compiler)")
    path, refs = bf16_case
    monkeypatch.setattr(core, "FP32_ACTIVATION_ROWS", 16)
    llm = bagualu.LLM(str(path), dtype="bfloat16", kv_cache_dtype="float32", max_num_batched_tokens=16,
                      **BF16_MODES[mode])
    runner = llm.engine.runner
    assert llm.engine.model.dtype == torch.bfloat16 and runner.stack is None and runner.wide is not None
    params = bagualu.SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    llm.close()


@pytest.mark.parametrize("packed,matrix_unit", [(True, False), (False, False), (True, True)],
                         ids=["packed", "unpacked", "matrix-unit"])
def test_bf16_model_mid_steps_round_projection_inputs(tmp_path, monkeypatch, fast_bf16_platform, packed, matrix_unit):
    """Steps above ``FP32_ACTIVATION_ROWS`` (here all: 0) on a platform that multiplies bf16 operands natively
    run the layer operator with each projection's input rounded to bf16 (autocast's rule): the model
    transformers computes in fp32 on the checkpoint's values with every ``nn.Linear``'s input rounded to bf16.
    Compared on every prompt position's logprob (teacher-forced, so a near-tie cannot fork the text), in
    chunked and whole prefill steps, and far from the unrounded model's. (Forced here on any CPU: without
    AVX512-BF16 the kernel rounds, then widens.) ``packed_weights``: steps of ``PACKED_MIN_ROWS`` or more
    multiply by the repacked projections and LM head where the CPU has the packed tiles — the same model.
    ``matrix_unit``: a platform that multiplies them on a matrix unit (AMX; forced here too) runs every step so,
    with ``FP32_ACTIVATION_ROWS`` as shipped, on the packed copies from one token up (8-token steps here)."""
    import transformers

    from bagualu.engine import core, runner

    if torch.bfloat16 not in linear_weight_dtypes():
        pytest.skip("the platform's linear does not read bf16 weights (no C++ compiler)")
    make_hf_model(hf_configs()["llama"]).to(torch.bfloat16).save_pretrained(tmp_path)
    byte_level_tokenizer().save(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # the checkpoint's values
    ps = [p for p in prompts() if len(p) > 16]
    with torch.no_grad():
        plain = [hf(torch.tensor([p])).logits[0].log_softmax(-1) for p in ps]
        hooks = [m.register_forward_pre_hook(lambda m, a: (a[0].bfloat16().float(),))
                 for m in hf.modules() if isinstance(m, torch.nn.Linear)]
        rounded = [hf(torch.tensor([p])).logits[0].log_softmax(-1) for p in ps]
    for h in hooks:
        h.remove()
    if matrix_unit:
        monkeypatch.setattr(runner, "linear_matrix_unit_dtypes", lambda: (torch.bfloat16,))
    else:
        monkeypatch.setattr(core, "FP32_ACTIVATION_ROWS", 0)
        monkeypatch.setattr(runner, "linear_matrix_unit_dtypes", lambda: ())
    monkeypatch.setattr(runner, "linear_half_operand_dtypes", lambda: (torch.bfloat16,))
    for budget in ((8, 256) if matrix_unit else (24, 256)):
        llm = bagualu.LLM(str(tmp_path), dtype="bfloat16", kv_cache_dtype="float32", max_num_batched_tokens=budget,
                          packed_weights=packed)
        r = llm.engine.runner
        assert r.half is not None
        assert (r.fp32_activation_rows, r.packed_min_rows) == ((0, 1) if matrix_unit else (0, runner.PACKED_MIN_ROWS))
        assert (r.head_packed is not None) == (packed and linear_cpu.packed_available(torch.bfloat16))
        outs = llm.generate(ps, bagualu.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        for p, out, want, far in zip(ps, outs, rounded, plain):
            got = torch.tensor([out.prompt_logprobs[j][p[j]] for j in range(1, len(p))])
            idx = torch.arange(len(p) - 1)
            # summation order may tip an input across a bf16 rounding boundary now and then (one position of
            # ~40 moved by 1e-4 here); on average the rounded model is 20x closer than the unrounded one
            near, off = (got - want[idx, p[1:]]).abs(), (got - far[idx, p[1:]]).abs()
            assert near.mean() < 2e-5 and near.max() < 5e-4 and off.mean() > 1e-4
        llm.close()


@pytest.mark.parametrize("arch", ["mixtral", "llama"])
def test_large_steps_on_a_matrix_unit(tmp_path, monkeypatch, fast_bf16_platform, arch):
    """Where the platform multiplies half operands on a matrix unit (AMX; forced here on any CPU), an MoE model's
    steps of every size run the layer operator with half operands, prefill steps above
    ``NATIVE_HALF_STEP_TOKENS`` included; a dense model's larger steps run in bf16. The MoE model's one
    whole-prompt prefill step computes what 16-token chunks compute: every prompt position's logprob."""
    from bagualu.engine import attention, runner

    if torch.bfloat16 not in linear_weight_dtypes():
        pytest.skip("the platform's linear does not read bf16 weights (no C++ compiler)")
    make_hf_model(hf_configs()[arch]).to(torch.bfloat16).save_pretrained(tmp_path)
    byte_level_tokenizer().save(tmp_path)
    monkeypatch.setattr(runner, "linear_matrix_unit_dtypes", lambda: (torch.bfloat16,))
    monkeypatch.setattr(runner, "linear_half_operand_dtypes", lambda: (torch.bfloat16,))
    seen = []
    run_layers = attention.LocalAttention.run_layers
    monkeypatch.setattr(attention.LocalAttention, "run_layers", lambda self, i, stack, x, *a: seen.append(
        (x.shape[0], x.dtype, stack.half_operands)) or run_layers(self, i, stack, x, *a))
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (150, 200, 90)]  # 440 tokens in one step
    params = bagualu.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    got = {}
    for budget in (16, 1024):
        seen.clear()
        llm = bagualu.LLM(str(tmp_path), dtype="bfloat16", kv_cache_dtype="float32", max_num_batched_tokens=budget)
        assert llm.engine.runner.half_step_tokens == (None if arch == "mixtral" else runner.NATIVE_HALF_STEP_TOKENS)
        outs = llm.generate(ps, params, use_tqdm=False)
        got[budget] = [torch.tensor([o.prompt_logprobs[j][p[j]] for j in range(1, len(p))]) for p, o in zip(ps, outs)]
        llm.close()
        assert all(dt == torch.float32 and half for n, dt, half in seen if n <= runner.NATIVE_HALF_STEP_TOKENS)
        if budget == 1024:
            large = {(dt, half) for n, dt, half in seen if n > runner.NATIVE_HALF_STEP_TOKENS}
            assert large == ({(torch.float32, True)} if arch == "mixtral" else {(torch.bfloat16, False)})
    if arch == "mixtral":
        for a, b in zip(got[16], got[1024]):
            assert (a - b).abs().mean() < 2e-5 and (a - b).abs().max() < 5e-4


@pytest.mark.parametrize("case", ["llama"], indirect=True)
def test_large_fp32_steps_keep_torch_on_one_thread(case, monkeypatch):
    """An fp32 model's step above the layer operator's limit is still the platform's kernels (its reference
    composes them) where the platform's ``linear`` runs fp32 GEMMs of every size on its own threads: torch's
    ops then run on one thread (``ops.threads.small_step``; the kernels keep the caller's count), so its
    OpenMP workers do not spin on the cores the kernels' threads need. The output is unchanged."""
    from bagualu.ops import linear_fp32_on_own_threads
    from bagualu.ops.threads import kernel_threads

    path, refs = case
    monkeypatch.setattr(runner_mod, "NATIVE_STEP_TOKENS", 8)  # the prefill steps here exceed it
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    execute = runner_mod.ModelRunner.execute
    monkeypatch.setattr(runner_mod.ModelRunner, "execute", lambda self, mbs: seen.append(
        (sum(st.num_tokens for st in mbs), torch.get_num_threads(), kernel_threads())) or execute(self, mbs))
    llm = bagualu.LLM(str(path))
    outs = llm.generate(prompts(), bagualu.SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW),
                        use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    large = {(torch_threads, kt) for n, torch_threads, kt in seen if n > 8}
    llm.close()
    torch.set_num_threads(before)
    assert large == ({(1, 2)} if linear_fp32_on_own_threads() else {(2, 2)})
