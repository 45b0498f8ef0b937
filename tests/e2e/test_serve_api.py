"""``bagualu serve``'s API beyond plain completions, driven by the official ``openai`` client and raw ``httpx``:
logit_bias, echo with logprobs (prompt scoring), structured outputs, tool calls, /tokenize and /detokenize.
The servers and references are ``tests/e2e/conftest.py``'s; the engine-side tests check each feature
against ``transformers``."""

from __future__ import annotations

import json

import pytest
from serve_harness import PROMPTS, error, post

import bagualu

pytestmark = pytest.mark.e2e


def test_logit_bias_through_the_openai_client(server):
    """OpenAI's logit_bias (token id strings -> [-100, 100]): +100 on a byte's token makes greedy decoding
    repeat it, in completions and chat; the engine's own test checks the bias against transformers."""
    client = server.client()
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                  logit_bias={str(ord("Q")): 100})
    assert r.choices[0].text == "QQQQQ"
    g = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logit_bias={str(ord("z")): 100})
    assert g.choices[0].message.content == "zzz"


def test_echo_with_logprobs_scores_the_prompt(server, model_dir):
    """``echo`` + ``logprobs``, as an evaluation harness asks for a loglikelihood: the prompt's tokens come
    first in the logprobs (the first scored null) with the offline engine's prompt logprobs (which the
    engine's test checks against transformers); streamed, the echo chunk carries them and comes first."""
    ids = [72, 101, 108, 108, 111, 32, 119, 111, 114]
    llm = bagualu.LLM(model_dir, num_kv_blocks=64)
    ref = llm.generate([ids], bagualu.SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                       use_tqdm=False)[0]
    llm.close()
    want = [ref.prompt_logprobs[j][ids[j]] for j in range(1, len(ids))]
    client = server.client()
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])  # keyed by text: tokens may share one
    assert text == "".join(lp.tokens) and lp.text_offset == sorted(lp.text_offset)
    chunks = [c for ev in client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, echo=True,
                                                    logprobs=2, stream=True) for c in ev.choices]
    assert chunks[0].text == "".join(lp.tokens[:len(ids)])
    assert chunks[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert sum((c.logprobs.tokens for c in chunks), []) == lp.tokens


def test_response_format_json_schema_and_json_object(server):
    """OpenAI's response_format through the official client: a json_schema's answer parses and matches it
    (chat and completions); json_object starts an object; an unknown type or a schema-less json_schema is a
    400 naming response_format."""
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    client = server.client()
    g = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                       temperature=0, response_format=fmt)
    obj = json.loads(g.choices[0].message.content)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9
    assert g.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=1.0, seed=3, n=2,
                                  extra_body={"response_format": fmt})
    assert all(set(json.loads(c.text)) == {"ok", "n"} for c in r.choices)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")
    c = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "Hi"}]
    error(post(server, c, {"messages": msgs, "response_format": {"type": "yaml"}}), param="response_format")
    error(post(server, c, {"messages": msgs, "response_format": {"type": "json_schema"}}), param="response_format")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
              "type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                             "maximum": 7}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {
              "type": "object", "additionalProperties": False, "required": ["a", "b"],
              "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                             "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}}]


def _valid_call(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7 and len(args) == 2
    return call.function.name == "add" and set(args) == {"a", "b"} and all(0 <= v <= 9 for v in args.values())


def test_tool_calls_through_the_openai_client(server, rw_server):
    """tool_choice naming a function, or required: the answer is tool_calls whose arguments follow the
    functions' schemas; none: text; auto: the model's text parsed (this random model writes no call, so
    text); streamed, the call comes as one delta; auto on a server without --tool-call-parser and malformed
    choices: 400s naming the field."""
    client = server.client()
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    g = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=60, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = g.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and _valid_call(call) and call.id.startswith("call_")
    assert g.choices[0].finish_reason == "tool_calls" and g.choices[0].message.content is None
    g = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=300, temperature=0.7,
                                       seed=1, tool_choice="required")
    calls = g.choices[0].message.tool_calls
    assert calls and all(_valid_call(c) for c in calls), g
    g = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=5, temperature=0,
                                       tool_choice="none")
    assert g.choices[0].message.tool_calls is None and isinstance(g.choices[0].message.content, str)
    g = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=5, temperature=0)
    assert g.choices[0].message.tool_calls is None and g.choices[0].message.content  # auto, parsed: no call
    c = "/v1/chat/completions"
    error(post(rw_server, c, {"messages": msgs, "tools": TOOLS}), param="tool_choice", code="unsupported")
    error(post(server, c, {"messages": msgs, "tools": TOOLS, "tool_choice": {"function": {"name": "nope"}}}),
          param="tool_choice")
    error(post(server, c, {"messages": msgs, "tools": [{"type": "function"}], "tool_choice": "required"}),
          param="tools.0")
    # streamed: the call comes whole, as one delta, and the stream ends
    chunks = [ch for ch in client.chat.completions.create(
        model="tiny", messages=msgs, tools=TOOLS, max_tokens=60, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}) if ch.choices]
    (call,) = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert call.function.name == "get_weather" and _valid_call(call) and call.index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tokenize_and_detokenize(server, offline):
    """vLLM's /tokenize and /detokenize: a prompt's ids are the engine's (the offline run's prompt ids), chat
    messages count what the chat endpoint bills as prompt tokens, and ids decode back."""
    refs, chat_ref = offline
    r = post(server, "/tokenize", {"prompt": PROMPTS[1]}).json()
    assert r["tokens"] == refs[1].prompt_token_ids and r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    r = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi there"}]}).json()
    assert r["tokens"] == chat_ref.prompt_token_ids
    text = post(server, "/detokenize", {"tokens": refs[1].prompt_token_ids}).json()["prompt"]
    assert text.endswith(PROMPTS[1])
    error(post(server, "/detokenize", {"tokens": [10**6]}), param="tokens")
    error(post(server, "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), param="prompt")
    error(post(server, "/tokenize", {"prompt": "a", "model": "gpt-4"}), param="model", code="model_not_found")
