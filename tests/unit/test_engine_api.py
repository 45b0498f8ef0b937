"""``bagualu.LLM`` as a user drives it: stop strings, EOS, n > 1, seeds, logprobs, aborts, errors."""

import gc

import pytest
import torch

import bagualu
from bagualu.engine import RequestError
from hf_models import save_byte_level_llama


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_byte_level_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=96)


@pytest.fixture(scope="module")
def llm(model_path):
    llm = bagualu.LLM(str(model_path), num_kv_blocks=32)
    yield llm
    llm.close()


def greedy(max_tokens, **kw):
    return bagualu.SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def test_strings_and_token_ids_give_the_same_output(llm):
    text = "def main():"
    ids = llm.tokenizer.encode(text)
    a, b = llm.generate([text, ids], greedy(8, ignore_eos=True), use_tqdm=False)
    assert a.token_ids == b.token_ids and a.prompt == text and b.prompt is None
    assert a.text == llm.tokenizer.decode(a.token_ids)


def test_stop_string_cuts_the_text_and_ends_the_sequence(llm):
    full = llm.generate("abc", greedy(24, ignore_eos=True), use_tqdm=False)[0]
    assert len(full.text) >= 6
    stop = full.text[3:5]
    cut = llm.generate("abc", greedy(24, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    at = full.text.find(stop)
    assert cut.text == full.text[:at]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    kept = llm.generate("abc", greedy(24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0]
    assert kept.text == full.text[:at + len(stop)]


def test_stop_token_ids_and_eos(llm):
    full = llm.generate("xyz", greedy(16, ignore_eos=True), use_tqdm=False)[0]
    tok = full.token_ids[5]
    out = llm.generate("xyz", greedy(16, ignore_eos=True, stop_token_ids=[tok]), use_tqdm=False)[0]
    first = full.token_ids.index(tok)
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == tok
    eos = llm.engine.eos_token_ids[0]
    logits_bias_prompt = [eos] * 3  # whatever the model says, a sequence that samples EOS stops there
    o = llm.generate([logits_bias_prompt], greedy(40), use_tqdm=False)[0]
    assert o.outputs[0].finish_reason == ("stop" if eos in o.token_ids else "length")
    if eos in o.token_ids:
        assert o.token_ids[-1] == eos and o.token_ids.count(eos) == 1


def test_n_and_seeds(llm):
    sp = bagualu.SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = llm.generate("hello", sp, use_tqdm=False)[0]
    assert len(a.outputs) == 3 and len({tuple(c.token_ids) for c in a.outputs}) > 1
    crowd = ["noise one", "noise two", "hello"]
    params = [bagualu.SamplingParams(temperature=1.0, max_tokens=10)] * 2 + [sp]
    b = llm.generate(crowd, params, use_tqdm=False)[2]
    assert [c.token_ids for c in b.outputs] == [c.token_ids for c in a.outputs]  # same seed, other batch


def test_logprobs(llm):
    o = llm.generate("q", greedy(5, logprobs=2, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(o.token_logprobs) == 5 and len(o.logprobs) == 5
    for tok, lp, top in zip(o.token_ids, o.token_logprobs, o.logprobs):
        assert tok in top and top[tok] == pytest.approx(lp) and lp <= 0
        assert lp == pytest.approx(max(top.values()))  # greedy takes the most likely token
    assert o.cumulative_logprob == pytest.approx(sum(o.token_logprobs))


def test_context_limit_and_bad_requests(llm):
    o = llm.generate([[5] * 90], bagualu.SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                     use_tqdm=False)[0]
    assert len(o.token_ids) == 96 - 90 and o.outputs[0].finish_reason == "length"
    with pytest.raises(RequestError, match="context is 96"):
        llm.generate([[5] * 96], greedy(1), use_tqdm=False)
    with pytest.raises(RequestError, match="max_tokens=20 plus the prompt's 90 tokens"):
        llm.generate([[5] * 90], greedy(20), use_tqdm=False)
    with pytest.raises(RequestError, match="token ids must lie in"):
        llm.generate([[5, 100000]], greedy(1), use_tqdm=False)
    with pytest.raises(TypeError, match="string or a list of token ids"):
        llm.generate([3.5], greedy(1), use_tqdm=False)
    assert llm.engine.kv.usage() == 0  # nothing leaked


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("long", "abcdef", greedy(50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.kv.usage() > 0
    assert eng.abort("long") and not eng.abort("long")
    outs = eng.step()
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert eng.kv.usage() == 0 and not eng.has_unfinished()
    assert eng.metrics.requests_finished["abort"] >= 1


def test_finished_only_steps_return_each_request_once_when_it_ends(llm):
    eng = llm.engine
    want = {"a": 3, "b": 7}
    for rid, n in want.items():
        eng.add_request(rid, "abc", greedy(n, ignore_eos=True))
    seen, steps = {}, 0
    while eng.has_unfinished():
        outs = eng.step(finished_only=True)
        steps += 1
        assert all(o.finished for o in outs)
        for o in outs:
            assert o.request_id not in seen
            seen[o.request_id] = (steps, len(o.outputs[0].token_ids))
    assert {r: n for r, (_, n) in seen.items()} == want
    assert seen["a"][0] < seen["b"][0]  # returned at the step it ended, not at the end
    eng.add_request("c", "abc", greedy(2, ignore_eos=True))
    assert [o.finished for o in eng.step()] == [False]  # a plain step reports running requests too
    while eng.has_unfinished():
        eng.step()


def test_engine_config_errors():
    with pytest.raises(ValueError, match="block_size=12"):
        bagualu.EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="admission='lifo'"):
        bagualu.EngineConfig(admission="lifo")


def test_r_worker_defaults_follow_where_the_s_part_runs():
    """With the S-part on an accelerator, two micro-batches (S and R overlap) and R-workers on half the cores;
    with it on the CPU, whose cores and memory both parts share, one micro-batch and every core for the workers
    while the S-part waits. Explicit settings win."""
    cfg = bagualu.EngineConfig(r_workers=2)
    assert (cfg.num_micro_batches(False), cfg.num_micro_batches(True)) == (2, 1)
    assert (cfg.r_worker_thread_count(False, 16), cfg.r_worker_thread_count(True, 16)) == (4, 8)
    assert bagualu.EngineConfig(r_workers=4).r_worker_thread_count(False, 2) == 1
    assert bagualu.EngineConfig().num_micro_batches(False) == 1  # in-process attention
    cfg = bagualu.EngineConfig(r_workers=1, micro_batches=2, r_worker_threads=3)
    assert (cfg.num_micro_batches(True), cfg.r_worker_thread_count(True, 16)) == (2, 3)


def test_r_workers_take_the_cores_this_process_may_use(llm, monkeypatch):
    """The workers' default thread count follows the process's affinity mask (a container's share), not the
    host's core count: here the S-part is on the CPU, so one worker takes all of them."""
    import os

    path = llm.engine.model.source_dir
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    for cores in ({0}, {0, 1, 2}):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(cores))
        eng = bagualu.LLM(str(path), r_workers=1, num_kv_blocks=16)
        assert (eng.engine.backend.threads, eng.engine.num_micro_batches) == (len(cores), 1)
        eng.close()


def test_half_precision_models_keep_a_half_kv_cache(llm):
    from bagualu.moe.experts import gemm_via_fp32

    path = llm.engine.model.source_dir
    half = bagualu.LLM(str(path), dtype="bfloat16", num_kv_blocks=16)
    slow_bf16 = gemm_via_fp32(torch.bfloat16, "cpu")
    assert half.engine.kv_spec.dtype == torch.bfloat16
    assert half.engine.model.dtype == (torch.float32 if slow_bf16 else torch.bfloat16)
    as_model = bagualu.LLM(str(path), dtype="bfloat16", gemm_dtype="model", num_kv_blocks=16)
    assert as_model.engine.model.dtype == torch.bfloat16
    sp = greedy(6, ignore_eos=True)
    for e in (half, as_model):
        assert len(e.generate("hi", sp, use_tqdm=False)[0].token_ids) == 6
        e.close()


def test_the_engine_freezes_what_it_was_built_with(llm):
    """What is alive when the engine is built (torch, the model, the tokenizer) is out of the collector's
    generations (``gc.freeze``), so a full collection during serving does not rescan it."""
    model = llm.engine.model
    assert gc.get_freeze_count() > 0
    assert gc.is_tracked(model) and all(o is not model for o in gc.get_objects())


def test_logit_bias_equals_transformers_sequence_bias(llm, model_path):
    """Greedy decoding with a logit bias equals ``transformers`` ``generate`` with the same single-token
    ``sequence_bias``; banning (-100) the tokens of the unbiased output keeps all of them out."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompt = llm.tokenizer.encode("def main():")
    plain = llm.generate([prompt], greedy(8), use_tqdm=False)[0].token_ids
    bias = {plain[0]: -100.0, plain[1]: -3.5, 97: 2.0, 98: -1.25}
    got = llm.generate([prompt], greedy(8, logit_bias=bias), use_tqdm=False)[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          sequence_bias={(t,): b for t, b in bias.items()})[0, len(prompt):].tolist()
    assert got == ref and got != plain
    banned = llm.generate([prompt], greedy(8, logit_bias={t: -100 for t in plain}), use_tqdm=False)[0].token_ids
    assert len(banned) == 8 and not set(banned) & set(plain)
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate([prompt], greedy(2, logit_bias={259: 1.0}), use_tqdm=False)  # vocab is 259
    with pytest.raises(ValueError, match="logit_bias"):
        bagualu.SamplingParams(logit_bias={5: 101})


def test_prompt_logprobs_equal_transformers(model_path):
    """Every prompt token's logprob given those before it (and the top alternatives) equal ``transformers``'
    log-softmax, with the prompt prefilled in chunks of 8 tokens, again with its blocks in the prefix cache
    (a scoring request computes its whole prompt), and for n=2 (the first sequence scores it)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    llm = bagualu.LLM(str(model_path), num_kv_blocks=32, max_num_batched_tokens=8)
    prompt = list(range(40, 77))
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    try:
        for params in (greedy(2, prompt_logprobs=3), greedy(2, prompt_logprobs=3), greedy(2, prompt_logprobs=0, n=2)):
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            plp = out.prompt_logprobs
            assert len(plp) == len(prompt) and plp[0] is None
            for j in range(1, len(prompt)):
                assert plp[j][prompt[j]] == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-5)
                want = set(ref[j - 1].topk(params.prompt_logprobs).indices.tolist()) | {prompt[j]}
                assert set(plp[j]) == want
        assert llm.generate([prompt], greedy(2), use_tqdm=False)[0].prompt_logprobs is None
    finally:
        llm.close()
    with pytest.raises(ValueError, match="prompt_logprobs"):
        bagualu.SamplingParams(prompt_logprobs=21)


def test_speculative_decoding_equals_plain_decoding(model_path):
    """Prompt-lookup speculation changes how many tokens a step computes, never which: greedy tokens, texts,
    finish reasons and logprobs equal a plain engine's with stop ids, stop strings and max_tokens falling
    inside accepted runs, and with penalties (each row counts the drafts before it); seeded sampling stays
    reproducible."""
    plain = bagualu.LLM(str(model_path), num_kv_blocks=64)
    spec = bagualu.LLM(str(model_path), num_kv_blocks=64, speculative_tokens=5, prompt_lookup_min=1)
    try:
        prompts = ["abcabcabcabcabc", "def main():\n    main()\n    main()\n", "x"]
        ref = plain.generate(prompts, greedy(30, ignore_eos=True), use_tqdm=False)
        stop_id = ref[0].token_ids[9]
        stop_str = ref[1].text[12:14]
        for params in (greedy(30, ignore_eos=True), greedy(30, stop_token_ids=[stop_id]), greedy(30, stop=[stop_str]),
                       greedy(7), greedy(20, logprobs=2, ignore_eos=True), greedy(20, min_tokens=15)):
            want = plain.generate(prompts, params, use_tqdm=False)
            got = spec.generate(prompts, params, use_tqdm=False)
            for w, g in zip(want, got):
                assert (g.token_ids, g.text, g.outputs[0].finish_reason) == (w.token_ids, w.text,
                                                                                w.outputs[0].finish_reason)
                if params.logprobs is not None:
                    assert g.outputs[0].token_logprobs == pytest.approx(w.outputs[0].token_logprobs, abs=1e-4)
        m = spec.engine.metrics
        assert m.spec_accepted_tokens > 20
        for pen in (greedy(20, repetition_penalty=1.8), greedy(20, frequency_penalty=2.0)):
            drafts = m.spec_draft_tokens
            assert [o.token_ids for o in spec.generate(prompts, pen, use_tqdm=False)] == [
                o.token_ids for o in plain.generate(prompts, pen, use_tqdm=False)]
            assert m.spec_draft_tokens > drafts
        seeded = bagualu.SamplingParams(temperature=0.9, seed=4, max_tokens=25)
        assert [o.token_ids for o in spec.generate(prompts, seeded, use_tqdm=False)] == [
            o.token_ids for o in spec.generate(prompts, seeded, use_tqdm=False)]
    finally:
        plain.close()
        spec.close()
    capped = bagualu.LLM(str(model_path), num_kv_blocks=64, speculative_tokens=4, prompt_lookup_min=1,
                         speculative_max_seqs=2)
    try:  # no drafts while more sequences run than speculative_max_seqs
        capped.generate(prompts, greedy(20, ignore_eos=True), use_tqdm=False)
        assert capped.engine.metrics.spec_draft_tokens == 0
        capped.generate(prompts[:2], greedy(20, ignore_eos=True), use_tqdm=False)
        assert capped.engine.metrics.spec_draft_tokens > 0
    finally:
        capped.close()
    with pytest.raises(ValueError, match="speculative_tokens"):
        bagualu.LLM(str(model_path), speculative_tokens=-1)
