"""``AsyncEngine``: the engine thread, asyncio streams, aborts, scoped errors, overload, loading, death, drain.

Every test drives a real ``EngineCore`` on a tiny random Llama (byte tokenizer) through the public
``AsyncEngine`` interface; the reference is ``bagualu.LLM`` offline on the same weights.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time

import pytest

import bagualu
from bagualu.engine import RequestError
from bagualu.engine.async_engine import (AsyncEngine, EngineDeadError, EngineOverloadedError, EngineShutdownError,
                                         EngineUnavailableError)
from hf_models import save_hf_model, transformers

GREEDY = {"temperature": 0, "max_tokens": 8}
LONG = bagualu.SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)  # runs for many seconds


def tiny_llama_dir(path):
    from bagualu.models.byte_tokenizer import byte_level_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   bos_token_id=256, eos_token_id=257, pad_token_id=258)
    save_hf_model(cfg, path)
    byte_level_tokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")))


def engine_over(model_dir, max_waiting=None, **options):
    options.setdefault("num_kv_blocks", 256)
    llm = bagualu.LLM(model_dir, **options)
    eng = AsyncEngine.from_core(llm.engine, max_waiting=max_waiting)
    eng.start()
    return eng


def run(eng, main):
    """``asyncio.run(main())``, and the engine thread stopped even when the test fails."""

    async def guarded():
        try:
            await main()
        finally:
            if eng.state not in ("stopped", "dead"):
                await eng.shutdown(0)

    asyncio.run(guarded())


async def until(pred, what, timeout=60.0):
    """Poll ``pred`` until true (a bound on waiting, not an assertion about speed)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


PROMPTS = ["Hello", "The furnace of eight trigrams", [5, 6, 7, 8, 9, 10, 11], "八卦炉"]


def test_concurrent_streams_equal_offline_and_loop_idles(model_dir):
    refs = bagualu.LLM(model_dir, num_kv_blocks=256).generate(PROMPTS, bagualu.SamplingParams(**GREEDY),
                                                              use_tqdm=False)
    eng = engine_over(model_dir)

    async def one(i, p):
        seen = []
        async for out in eng.generate(f"r{i}", p, bagualu.SamplingParams(**GREEDY)):
            seen.append(list(out.token_ids))
        for a, b in itertools.pairwise(seen):  # cumulative outputs: each extends the one before
            assert b[:len(a)] == a
        return out

    async def main():
        await eng.wait_ready(60)
        assert eng.healthy and eng.state == "ready"
        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
        assert [o.text for o in outs] == [r.text for r in refs]
        assert all(o.finished for o in outs)
        steps = eng.metrics.steps
        await asyncio.sleep(0.3)
        assert eng.metrics.steps == steps  # idle: the loop sleeps instead of stepping
        await eng.shutdown(5)
        assert eng.state == "stopped" and not eng.healthy

    run(eng, main)


def test_consumer_that_stops_early_aborts_and_frees_kv(model_dir):
    eng = engine_over(model_dir)

    async def main():
        await eng.wait_ready(60)
        n = 0
        async for out in eng.generate("long", "Hello", LONG):
            n += 1
            if n == 3:
                break  # the generator is finalised (aclose): the request must be aborted
        m = eng.metrics
        await until(lambda: m.requests_finished["abort"] == 1 and m.num_running == 0 and m.kv_usage == 0,
                    "the aborted request to free its KV blocks")
        # a consumer task cancelled while waiting for tokens is aborted too
        got_one = asyncio.Event()

        async def consume():
            async for _ in eng.generate("cancelled", "Hi", LONG):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until(lambda: m.requests_finished["abort"] == 2 and m.num_running == 0 and m.kv_usage == 0,
                    "the cancelled request to free its KV blocks")
        await eng.shutdown(5)

    run(eng, main)


def test_bad_requests_fail_alone(model_dir):
    eng = engine_over(model_dir, max_model_len=64)

    async def main():
        await eng.wait_ready(60)
        good = asyncio.create_task(_collect(eng.generate("good", "Hello", bagualu.SamplingParams(**GREEDY))))
        with pytest.raises(RequestError, match="context is 64"):
            await eng.add_request("too-long", list(range(3, 100)), bagualu.SamplingParams())
        with pytest.raises(RequestError, match=r"max_tokens=100 .* exceeds the model's context of 64"):
            await eng.add_request("too-many", "Hi", bagualu.SamplingParams(max_tokens=100))
        with pytest.raises(RequestError, match="token ids must lie in"):
            await eng.add_request("bad-ids", [1, 2, 999], bagualu.SamplingParams())
        hold = bagualu.SamplingParams(max_tokens=50, ignore_eos=True)
        with pytest.raises(RequestError, match="already in use"):
            s = await eng.add_request("dup", "Hi", hold)
            await eng.add_request("dup", "Hi", hold)
        s.close()
        out = await good
        assert out.finished and len(out.token_ids) >= 1
        assert eng.healthy
        out = await _collect(eng.generate("after", "Hello", bagualu.SamplingParams(**GREEDY)))
        assert out.finished
        await eng.shutdown(5)

    run(eng, main)


async def _collect(agen):
    out = None
    async for out in agen:
        pass
    return out


def test_bounded_waiting_queue_refuses_with_overload(model_dir):
    eng = engine_over(model_dir, max_waiting=1, max_num_seqs=1)

    async def main():
        await eng.wait_ready(60)
        a = await eng.add_request("a", "Hello", LONG)
        await a.__anext__()  # a is running (max_num_seqs=1)
        b = await eng.add_request("b", "Hello", LONG)  # b waits
        with pytest.raises(EngineOverloadedError, match="max_waiting=1") as e:
            await eng.add_request("c", "Hello", LONG)
        assert isinstance(e.value, EngineUnavailableError) and e.value.reason == "overloaded"
        assert eng.rejected["overloaded"] == 1
        a.close()
        await b.__anext__()  # b got the slot
        b.close()
        m = eng.metrics
        await until(lambda: m.num_running == 0 and m.num_waiting == 0 and m.kv_usage == 0, "both aborts")
        out = await _collect(eng.generate("d", "Hello", bagualu.SamplingParams(**GREEDY)))
        assert out.finished
        await eng.shutdown(5)

    run(eng, main)


def test_unhealthy_while_loading_then_ready(model_dir):
    go = threading.Event()
    llm = bagualu.LLM(model_dir, num_kv_blocks=64)

    def slow_load():
        go.wait()
        return llm.engine

    eng = AsyncEngine(slow_load)
    eng.start()

    async def main():
        assert eng.state == "loading" and not eng.healthy and eng.metrics is None
        with pytest.raises(EngineUnavailableError, match="still loading") as e:
            await eng.add_request("early", "Hi", bagualu.SamplingParams())
        assert e.value.reason == "loading"
        go.set()
        await eng.wait_ready(60)
        assert eng.healthy
        assert (await _collect(eng.generate("r", "Hi", bagualu.SamplingParams(**GREEDY)))).finished
        await eng.shutdown(5)

    run(eng, main)


def test_loading_failure_is_recorded():
    def broken():
        raise FileNotFoundError("no model here")

    dead = []
    eng = AsyncEngine(broken, on_dead=dead.append)
    eng.start()

    async def main():
        with pytest.raises(EngineDeadError, match="no model here"):
            await eng.wait_ready(30)
        assert eng.state == "dead" and eng.load_failed and not eng.healthy
        assert isinstance(dead[0], FileNotFoundError)

    run(eng, main)


def test_loop_death_fails_in_flight_requests_and_health(model_dir):
    """A real fault inside ``step()``: an R-worker process is killed mid-request."""
    dead = []
    llm = bagualu.LLM(model_dir, num_kv_blocks=64, r_workers=1)
    eng = AsyncEngine.from_core(llm.engine, on_dead=dead.append)
    eng.start()

    async def main():
        await eng.wait_ready(60)
        stream = await eng.add_request("victim", "Hello", LONG)
        await stream.__anext__()
        for pid in llm.engine.backend.worker_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="R-worker"):
            async for _ in stream:
                pass
        await until(lambda: eng.state == "dead" and dead, "the loop to record its death")
        assert not eng.healthy and dead and "R-worker" in str(dead[0])
        with pytest.raises(EngineUnavailableError, match="loop died") as e:
            await eng.add_request("later", "Hi", bagualu.SamplingParams())
        assert e.value.reason == "dead"

    run(eng, main)


def test_drain_finishes_in_flight_then_aborts_the_rest(model_dir):
    eng = engine_over(model_dir)

    async def main():
        await eng.wait_ready(60)
        short = await eng.add_request("short", "Hello", bagualu.SamplingParams(**GREEDY))
        long = await eng.add_request("long", "Hello", LONG)
        eng.begin_drain(timeout=3600)
        assert eng.state == "draining" and not eng.healthy
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await eng.add_request("new", "Hi", bagualu.SamplingParams())
        out = await _collect(short)  # in flight: still served while draining
        assert out.finished and out.outputs[0].finish_reason == "length"
        await eng.shutdown(timeout=0)  # the drain time is up: abort what is left
        with pytest.raises(EngineShutdownError, match="drain timeout"):
            await _collect(long)
        assert eng.state == "stopped"
        assert eng.metrics.requests_finished["abort"] == 1 and eng.metrics.kv_usage == 0

    run(eng, main)
