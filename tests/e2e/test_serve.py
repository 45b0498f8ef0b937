"""``bagualu serve`` as a user runs it: a real server process driven by the official ``openai`` client
(completions, chat, streaming, n, logprobs) and by raw ``httpx`` (errors, overload, health, metrics,
disconnects, SIGTERM). The reference for every greedy text is ``bagualu.LLM`` offline on the same
weights. The two servers and the references are ``tests/e2e/conftest.py``'s (harness: ``tests/serve_harness.py``);
``test_serve_api.py`` covers the API beyond plain completions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import openai
import pytest
from serve_harness import BAGUALU, LONG, PROMPTS, Server, error, free_port, post

pytestmark = pytest.mark.e2e


def test_health_models_and_greedy_completions_equal_offline(server, offline):
    refs, _ = offline
    assert server.health_seen[-1] == (200, "ready")
    assert all(seen == (503, "loading") for seen in server.health_seen[:-1])
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in refs]
    assert [c.finish_reason for c in r.choices] == [o.outputs[0].finish_reason for o in refs]
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in refs)
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in refs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # token ids as the prompt give the same text as the string
    ids = refs[1].prompt_token_ids
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == refs[1].text


def test_streaming_equals_non_streaming(server, offline):
    refs, chat_ref = offline
    client = server.client()
    texts: dict[int, str] = {}
    usage = None
    finish = {}
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert [texts[i] for i in range(len(PROMPTS))] == [o.text for o in refs]
    assert len(finish) == len(PROMPTS)
    assert usage.completion_tokens == sum(len(o.token_ids) for o in refs)

    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == chat_ref.text
    assert whole.usage.prompt_tokens == len(chat_ref.prompt_token_ids)
    parts, roles, reasons = [], [], []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                stream=True):
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            parts.append(c.delta.content or "")
            reasons += [c.finish_reason] if c.finish_reason else []
    assert "".join(parts) == chat_ref.text and roles == ["assistant"] and reasons == [whole.choices[0].finish_reason]
    # a stop string: the stream never shows text it then retracts, and ends where the whole text ends
    ref = max(refs, key=lambda o: len(o.text)).text
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    expected = ref[:ref.find(stop)]
    prompt = PROMPTS[[o.text for o in refs].index(ref)]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    streamed = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, temperature=0, stop=[stop], stream=True) if c.choices]
    assert "".join(streamed) == expected
    # the raw stream is SSE lines ending in [DONE]
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60, json={
            "messages": messages, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n_seed_and_logprobs(server):
    client = server.client()
    r = client.completions.create(model="tiny", prompt=["Hello", "Bye"], n=3, max_tokens=6, temperature=1.0,
                                  seed=7, logprobs=2)
    assert sorted(c.index for c in r.choices) == list(range(6))
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
        assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    again = client.completions.create(model="tiny", prompt=["Hello", "Bye"], n=3, max_tokens=6, temperature=1.0,
                                      seed=7, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # per-request seeds
    g = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = g.choices[0].logprobs.content
    assert len(content) == g.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == max(x.logprob for x in t.top_logprobs)  # greedy
        assert t.top_logprobs[0].token == t.token and isinstance(t.bytes, list)


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    c = "/v1/completions"
    error(post(server, c, {"max_tokens": 4}), param="prompt", code="missing_field")
    error(post(server, c, {"prompt": 5}), param="prompt", code="invalid_type")
    error(post(server, c, {"prompt": "hi", "temperature": "hot"}), param="temperature")
    error(post(server, c, {"prompt": "hi", "temperature": -1}), param="temperature")
    error(post(server, c, {"prompt": "hi", "top_p": 0}), param="top_p")
    error(post(server, c, {"prompt": "hi", "n": 0}), param="n")
    error(post(server, c, {"prompt": "hi", "max_tokens": 0}), param="max_tokens")
    err = error(post(server, c, {"prompt": "hi", "max_tokens": 5000}), param="max_tokens",
                 code="context_length_exceeded")
    assert "5000" in err["message"] and "2048" in err["message"]
    err = error(post(server, c, {"prompt": [7] * 3000}), param="prompt", code="context_length_exceeded")
    assert "3000" in err["message"]
    error(post(server, c, {"prompt": [[7, 8], [7] * 3000]}), param="prompt", code="context_length_exceeded")
    error(post(server, c, {"prompt": "hi", "model": "gpt-4"}), param="model", code="model_not_found")
    error(post(server, c, {"prompt": "hi", "logit_bias": {"five": 1}}), param="logit_bias")
    error(post(server, c, {"prompt": "hi", "logit_bias": {"5": 101}}), param="logit_bias")
    error(post(server, c, {"prompt": "hi", "logit_bias": {"320": 1}}), param="logit_bias")  # vocab is 320
    error(post(server, c, {"prompt": "hi", "echo": True, "logprobs": 21}), param="logprobs")
    error(httpx.post(server.base + c, content=b"{not json", headers={"content-type": "application/json"}),
          code="invalid_json")
    chat = "/v1/chat/completions"
    error(post(server, chat, {"messages": []}), param="messages")
    error(post(server, chat, {"messages": [{"content": "hi"}]}), param="messages.0.role", code="missing_field")
    error(post(server, chat, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
          param="top_logprobs")
    error(post(server, chat, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9999}),
          param="max_completion_tokens", code="context_length_exceeded")
    error(post(server, chat, {"messages": [{"role": "user", "content": "hi"}], "model": "nope", "stream": True}),
          param="model", code="model_not_found")
    error(httpx.get(server.base + "/v1/nothing"), status=404, code="not_found")
    with pytest.raises(openai.BadRequestError, match="not served"):
        server.client().completions.create(model="other", prompt="hi", max_tokens=2)
    # everyone else is still served
    assert httpx.get(server.base + "/health").status_code == 200
    r = post(server, c, {"prompt": "hi", "max_tokens": 3, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("hi")


def test_metrics_parse_and_move(server):
    before = server.metrics()
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    after = server.until_idle()
    assert after["bagualu_generation_tokens_total"] - before["bagualu_generation_tokens_total"] == 5
    assert after["bagualu_prompt_tokens_total"] - before["bagualu_prompt_tokens_total"] == 6
    assert after["bagualu_request_success_total|finished_reason=length"] == \
        before["bagualu_request_success_total|finished_reason=length"] + 1
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"bagualu_{h}_count"] == before[f"bagualu_{h}_count"] + 1
        assert after[f"bagualu_{h}_bucket|le=+Inf"] == after[f"bagualu_{h}_count"]
    assert after["bagualu_engine_healthy"] == 1 and "bagualu_num_preemptions_total" in after


def test_client_disconnect_aborts_and_frees_kv(server):
    aborts = server.metrics()["bagualu_request_success_total|finished_reason=abort"]
    with httpx.stream("POST", server.base + "/v1/completions", timeout=60,
                      json={"prompt": "Hello", "stream": True, **LONG}) as r:
        lines = r.iter_lines()
        got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert got and server.metrics()["bagualu_num_requests_running"] == 1
    m = server.until_idle()  # the stream was closed mid-way: the request is aborted, its blocks freed
    assert m["bagualu_request_success_total|finished_reason=abort"] == aborts + 1
    # a non-streaming client that gives up (1900 decode steps take over a second even on a fast machine)
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(timeout=httpx.Timeout(60, read=0.4)) as c:
            c.post(server.base + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], **LONG})
    m = server.until_idle()
    assert m["bagualu_request_success_total|finished_reason=abort"] == aborts + 2


def test_r_workers_health_while_loading_and_greedy_equal_offline(rw_server, offline):
    refs, _ = offline
    seen = rw_server.health_seen
    assert (503, "loading") in seen and seen[-1] == (200, "ready")  # two worker processes take seconds to start
    # 8 MiB of KV over 2 pools; a block is 2 layers x (k, v) x 16 tokens x 2 heads x 16 dims x 4 bytes = 8 KiB
    assert "KV 512 blocks x 16 tokens per pool, 2 pool(s) (r_workers)" in rw_server.log.read_text()
    client = rw_server.client()
    name = client.models.list().data[0].id  # default name: MODEL_DIR as given
    r = client.completions.create(model=name, prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in refs]


def test_overload_gets_503_with_retry_after(rw_server):
    body = {"prompt": "Hello", "stream": True, **LONG}
    url = rw_server.base + "/v1/completions"
    with httpx.Client(timeout=60) as http, contextlib.ExitStack() as streams:
        readers = []  # keep each line iterator alive: dropping one closes its connection (a disconnect)
        for _ in range(4):  # --max-num-seqs 4: these four run ...
            r = streams.enter_context(http.stream("POST", url, json=body))
            readers.append(r.iter_lines())
            assert next(readers[-1]).startswith("data: ")
        waiting = streams.enter_context(http.stream("POST", url, json=body))
        assert waiting.status_code == 200  # ... this one is accepted and waits (--max-waiting 1) ...
        r = http.post(url, json={"prompt": "Hi", "max_tokens": 2})  # ... and this one is refused
        err = error(r, status=503, code="overloaded")
        assert err["type"] == "server_error" and "max_waiting=1" in err["message"]
        assert int(r.headers["Retry-After"]) >= 1
        rw_server.until(lambda m: (m["bagualu_num_requests_running"], m["bagualu_num_requests_waiting"]) == (4, 1),
                        "4 running and 1 waiting (gauges are updated by the next step)")
    m = rw_server.until_idle()  # every client hung up: all five aborted, every KV block free
    assert m["bagualu_requests_rejected_total|reason=overloaded"] == 1
    assert m["bagualu_request_success_total|finished_reason=abort"] == 5


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the R-worker processes through /proc")
def test_engine_loop_death_fails_requests_and_health(rw_server):
    """A real fault inside the engine loop — an R-worker process is killed: the request that meets it gets
    a 500, /health turns 503 and says why, later requests get 503, and SIGTERM still exits 0 (teardown)."""
    workers = _children(rw_server.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    r = post(rw_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    err = error(r, status=500, code="engine_dead")
    assert "R-worker" in err["message"]
    health = httpx.get(rw_server.base + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "dead" and "R-worker" in health.json()["error"]
    r = post(rw_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    error(r, status=503, code="dead")
    assert "Retry-After" not in r.headers
    assert rw_server.metrics()["bagualu_engine_healthy"] == 0


def test_sigterm_drains_in_flight_then_exits_0(long_model_dir, tmp_path):
    """--drain-timeout 4: a short request in flight finishes (or, on a very slow machine, gets a clean 503);
    a long stream (65000 tokens: minutes on any CPU) gets an error event and [DONE] once the drain time is up;
    the process exits 0."""
    server = Server(long_model_dir, "--num-kv-blocks", "4200", "--drain-timeout", "4", log=tmp_path / "serve.log")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    results = {}

    def short():
        results["short"] = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True})

    def long():
        with httpx.stream("POST", server.base + "/v1/completions", timeout=120,
                          json={"prompt": "Hello", "stream": True, "max_tokens": 65000, "ignore_eos": True}) as r:
            results["long"] = [line for line in r.iter_lines() if line]

    threads = [threading.Thread(target=long), threading.Thread(target=short)]
    threads[0].start()
    server.until(lambda m: m["bagualu_num_requests_running"] >= 1, "the long request to run")
    threads[1].start()
    server.until(lambda m: m["bagualu_num_requests_running"] >= 2 or not threads[1].is_alive(),
                 "the short request to run")
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=90)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()
    r = results["short"]
    if r.status_code == 200:
        assert r.json()["usage"]["completion_tokens"] == 12
    else:
        error(r, status=503, code="shutting_down")
    events = results["long"]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "shutting_down" and "drain" in err["message"]
    log = server.log.read_text()
    assert "draining in-flight requests" in log and "Traceback" not in log


def test_a_model_that_fails_to_load_stops_the_server_with_exit_1(model_dir, tmp_path):
    for f in Path(model_dir).glob("tokenizer*"):  # a tokenizer but no weights or config
        (tmp_path / f.name).write_bytes(f.read_bytes())
    p = subprocess.run([BAGUALU, "serve", str(tmp_path), "--port", str(free_port())], capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 1, p.stderr
    assert "the model failed to load" in p.stderr and "config.json" in p.stderr
