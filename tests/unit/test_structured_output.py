"""Structured outputs (``SamplingParams.structured_output``, xgrammar): outputs that parse and match the
schema, greedy decoding equal to ``transformers``' argmax restricted to the grammar's tokens, clear errors."""

import json
import re
import sys

import pytest
import torch
from hf_models import save_byte_level_llama

import bagualu
from bagualu.engine import RequestError
from bagualu.engine.structured import StructuredOutput

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "colour"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "colour": {"enum": ["red", "green", "blue"]}}}


def _matches(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"ok", "n", "colour"} and isinstance(obj["ok"], bool)
            and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99 and obj["colour"] in ("red", "green", "blue"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_byte_level_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llm(model_path):
    llm = bagualu.LLM(str(model_path), num_kv_blocks=64)
    yield llm
    llm.close()


def test_outputs_parse_and_match_the_schema(llm):
    so = StructuredOutput(json=SCHEMA)
    plain = llm.generate(["Hello"], bagualu.SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    with pytest.raises(ValueError):
        json.loads(plain.text)  # the model alone does not write JSON
    for params in (bagualu.SamplingParams(temperature=0, max_tokens=80, structured_output=so),
                   bagualu.SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=80, structured_output=so,
                                          min_tokens=70, ignore_eos=True)):  # the grammar ends them anyway
        for out in llm.generate(["Hello", [5, 6, 7, 8, 9]], params, use_tqdm=False):
            for c in out.outputs:
                assert c.finish_reason == "stop" and c.token_ids[-1] == 257, c
                assert _matches(json.loads(c.text)), c.text
    out = llm.generate(["x"], bagualu.SamplingParams(temperature=1.0, seed=2, max_tokens=30, structured_output=
                       StructuredOutput(regex=r"(yes|no)-[0-9]{3}")), use_tqdm=False)[0]
    assert re.fullmatch(r"(yes|no)-[0-9]{3}", out.text) and out.outputs[0].finish_reason == "stop"


def test_greedy_equals_transformers_argmax_over_the_grammars_tokens(llm, model_path):
    """At every step the engine's token is the argmax of ``transformers``' logits over the tokens an
    independent xgrammar matcher allows there."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompt = llm.tokenizer.encode("Hello")
    got = llm.generate([prompt], bagualu.SamplingParams(temperature=0, max_tokens=80, structured_output=
                       StructuredOutput(json=SCHEMA)), use_tqdm=False)[0].token_ids
    matcher = llm.engine.grammars.matcher(StructuredOutput(json=SCHEMA))
    bitmask = xgr.allocate_token_bitmask(1, 259)
    ids = list(prompt)
    with torch.no_grad():
        for tok in got:
            logits = hf(torch.tensor([ids])).logits[:, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            assert int(logits.argmax()) == tok
            matcher.accept_token(tok)
            ids.append(tok)
    assert matcher.is_terminated()


def test_bad_grammars_and_a_missing_xgrammar_are_clear_errors(llm, monkeypatch):
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(json=SCHEMA, regex="a")
    with pytest.raises(RequestError, match="cannot compile") as e:
        llm.generate(["x"], bagualu.SamplingParams(structured_output=StructuredOutput(regex="(")), use_tqdm=False)
    assert e.value.param == "response_format"
    fresh = type(llm.engine.grammars)(llm.tokenizer, 259, (257,))
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if it were not installed
    with pytest.raises(ValueError, match="pip install 'bagualu\\[structured\\]'"):
        fresh.matcher(StructuredOutput(json_object=True))


def test_vllm_guided_fields_map_onto_structured_outputs(llm):
    """vLLM's guided_json / guided_regex / guided_choice / guided_grammar: each becomes the structured output
    it names (a choice with regex metacharacters matches itself); two at once is a 400 naming one."""
    from bagualu.serve.errors import APIError
    from bagualu.serve.protocol import CompletionRequest, to_sampling_params

    def so(**kw):
        return to_sampling_params(CompletionRequest(prompt="x", **kw)).structured_output

    assert so(guided_json=SCHEMA) == StructuredOutput(json=json.dumps(SCHEMA))
    assert so(guided_regex="[ab]+") == StructuredOutput(regex="[ab]+")
    assert so(guided_grammar='root ::= "yes"') == StructuredOutput(grammar='root ::= "yes"')
    assert so() is None and so(response_format={"type": "text"}) is None
    with pytest.raises(APIError):
        so(guided_regex="a", response_format={"type": "json_object"})
    choices = ["a.b (c)?", "x|y", "plain"]
    params = to_sampling_params(CompletionRequest(prompt="x", guided_choice=choices, temperature=1.0, seed=3, n=6,
                                                  max_tokens=20))
    texts = {c.text for c in llm.generate(["pick"], params, use_tqdm=False)[0].outputs}
    assert texts <= set(choices) and texts


def test_speculation_under_a_grammar_gives_the_same_outputs(llm, model_path):
    """A constrained sequence speculates too: each draft row is masked by the matcher advanced through the
    drafts before it (then rolled back); greedy outputs equal the plain engine's, seeded ones stay valid."""
    spec = bagualu.LLM(str(model_path), num_kv_blocks=64, speculative_tokens=4, prompt_lookup_min=1)
    try:
        so = StructuredOutput(json=SCHEMA)
        prompts = ['{"ok": true, "n": 7, "colour": "red"} {"ok": true, "n": 7, "colour": "red"}', "Hello"]
        greedy = bagualu.SamplingParams(temperature=0, max_tokens=80, structured_output=so)
        want = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert [o.token_ids for o in spec.generate(prompts, greedy, use_tqdm=False)] == want
        assert spec.engine.metrics.spec_accepted_tokens > 0
        seeded = bagualu.SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=80, structured_output=so)
        for out in spec.generate(prompts, seeded, use_tqdm=False):
            assert all(_matches(json.loads(c.text)) for c in out.outputs)
    finally:
        spec.close()
