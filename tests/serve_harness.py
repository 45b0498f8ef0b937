"""The ``bagualu serve`` test harness: a real server process (``Server``), the tiny model it serves, and
the request/error helpers the e2e serving tests share (fixtures in ``tests/e2e/conftest.py``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from hf_models import save_hf_model, transformers
from prometheus_client.parser import text_string_to_metric_families

BAGUALU = str(Path(sys.executable).parent / "bagualu")
PROMPTS = ["Hello", "The furnace of eight trigrams", "八卦炉"]
LONG = {"max_tokens": 1900, "ignore_eos": True}  # far longer than any test waits for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: str, *args: str, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([BAGUALU, "serve", model_dir, "--port", str(self.port), *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.health_seen: list[tuple[int, str]] = []

    def wait_ready(self, timeout=180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bagualu serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                r = httpx.get(self.base + "/health", timeout=5)
                self.health_seen.append((r.status_code, r.json()["status"]))
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log.read_text()}")

    def client(self):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        out = {}
        for fam in text_string_to_metric_families(httpx.get(self.base + "/metrics", timeout=10).text):
            for s in fam.samples:
                labels = "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[s.name + labels] = s.value
        return out

    def until(self, pred, what: str, timeout=60.0) -> dict[str, float]:
        """Poll /metrics until ``pred(metrics)`` holds (a bound on waiting, not a speed assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if pred(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {m}")
            time.sleep(0.05)

    def until_idle(self) -> dict[str, float]:
        """Nothing runs, nothing waits and no KV block is in use."""
        return self.until(lambda m: (m["bagualu_num_requests_running"], m["bagualu_num_requests_waiting"],
                                     m["bagualu_kv_cache_usage_perc"]) == (0, 0, 0), "the server to go idle")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def post(server, path, body, **kw):
    return httpx.post(server.base + path, json=body, timeout=kw.pop("timeout", 60), **kw)


def tiny_llama(path: Path, max_positions: int) -> str:
    from bagualu.models.byte_tokenizer import byte_level_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                                   bos_token_id=256, eos_token_id=257, pad_token_id=258)
    save_hf_model(cfg, path)
    byte_level_tokenizer().save(path)
    return str(path)


def error(r, status=400, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def catch(fn, errors):
    try:
        fn()
    except BaseException as e:
        errors.append(e)
