"""Fixtures of the e2e serving tests: the tiny model, two ``bagualu serve`` processes per module (a default one
and one with two R-workers, four running sequences and a waiting queue of one), and offline references."""

from __future__ import annotations

import threading

import pytest
from serve_harness import PROMPTS, Server, catch, tiny_llama

import bagualu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), 2048)


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The same tiny model with a 64k context, so that one request can outlast any drain time on any machine."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama-64k"), 65536)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory, request):
    """Both servers start at once; the R-workers one is polled from its first moment, in a thread, to
    see it load, while the default one's tests run; the offline references are computed meanwhile."""
    logs = tmp_path_factory.mktemp("logs")
    main = Server(model_dir, "--served-model-name", "tiny", "--num-kv-blocks", "512", "--drain-timeout", "4",
                  "--tool-call-parser", "hermes", log=logs / "serve.log")
    rw = Server(model_dir, "--r-workers", "2", "--kv-cache-memory", "8MiB", "--max-num-seqs", "4", "--max-waiting", "1",
                log=logs / "serve-rw.log")
    rw.errors = []
    rw.poll = threading.Thread(target=catch, args=(rw.wait_ready, rw.errors))
    rw.poll.start()
    try:
        request.getfixturevalue("offline")
        main.wait_ready()
        yield main, rw
    finally:
        rw.poll.join()
        codes = main.stop(), rw.stop()
    assert codes == (0, 0)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def rw_server(servers):
    rw = servers[1]
    rw.poll.join()
    if rw.errors:
        raise rw.errors[0]
    return rw


@pytest.fixture(scope="module")
def offline(model_dir):
    """Greedy references: 8 tokens of each prompt, and of the chat prompt for one user message."""
    llm = bagualu.LLM(model_dir, num_kv_blocks=64)
    p = bagualu.SamplingParams(temperature=0, max_tokens=8)
    texts = [o for o in llm.generate(PROMPTS, p, use_tqdm=False)]
    chat_ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True)
    chat = llm.generate([chat_ids], p, use_tqdm=False)[0]
    llm.close()
    return texts, chat
