"""Online half of ``benchmarks/serve.py``: ``bagualu serve`` (and ``vllm serve``, when vLLM's environment exists:
``vllm_peer.py``) in a subprocess, Poisson arrivals over HTTP.

For each request rate, ``--online-requests`` streamed completions (random token-id prompts, fixed output
length, no early stop) arrive with exponential gaps; TTFT is the time to the first streamed token and
TPOT the time from it to the end of the stream over the tokens after the first, both seen by the client.
Reported per engine (ours with the R-part in-process and in R-workers; vLLM) as p50/p99 and generated tokens/s
over the run.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cmd: list[str], port: int, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server (``cmd`` listening on ``port``) and wait until its ``/health`` answers 200."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:3])} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd[:3])} did not become healthy within 300 s")


def _servers(args, path: Path) -> dict:
    """engine name -> () -> (process, url): ``bagualu serve`` per engine mode, and ``vllm serve`` when vLLM's
    environment exists (``vllm_peer.py``)."""
    import vllm_peer

    exe = str(Path(sys.executable).parent / "bagualu")
    dtype = args.dtypes[0]

    def ours(extra):
        def start():
            port = _free_port()
            return _start_server([exe, "serve", str(path), "--port", str(port), "--dtype", dtype, *extra], port)
        return start

    def vllm():
        port = _free_port()
        return _start_server(vllm_peer.server_command(path, dtype, port, args.prompt_len + args.output_len + 8,
                                                      args.vllm_python), port, vllm_peer.env())

    out = {"in-process": ours([])} | {f"r-workers={w}": ours(["--r-workers", str(w)]) for w in args.r_workers}
    if not args.no_vllm and vllm_peer.available(args.vllm_python):
        out["vLLM"] = vllm
    return out


async def _one(client, url, model, prompt, out_len, t_arrive) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "min_tokens": out_len, "temperature": 0,
            "ignore_eos": True, "stream": True}
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                stamps.append(time.perf_counter())
    t_end = time.perf_counter()
    if not stamps:
        return {"ttft": None, "tpot": None, "tokens": 0}
    # per token, not per chunk: a server sends what has accumulated since its last chunk when the client reads
    # slower than tokens come (under load a short request can arrive in one or two chunks); the usual
    # definition, (latency - TTFT) / (tokens - 1), with the latency ending when the stream does
    tpot = (t_end - stamps[0]) / (out_len - 1) if out_len > 1 else None
    return {"ttft": stamps[0] - t_arrive, "tpot": tpot, "tokens": out_len}


async def _load(url, model, prompts, out_len, rate, seed=0) -> tuple[list[dict], float]:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(_one(client, url, model, p, out_len, time.perf_counter())))
            await asyncio.sleep(rng.expovariate(rate))
        res = await asyncio.gather(*tasks)
    return res, time.perf_counter() - t0


def _pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(int(q / 100 * len(xs)), len(xs) - 1)] if xs else None


def online(args, root: Path, make_model_dir) -> list[dict]:
    from serve import prompts_for, MODELS

    rows = []
    for name in args.models:
        path = make_model_dir(name, root)
        vocab = MODELS[name]["vocab_size"]
        # fresh prompts for the warm-up and for every rate: the server's prefix cache must not serve a
        # timed run with what an earlier one computed
        warm = prompts_for(2, args.prompt_len, vocab, seed=1)
        per_rate = [prompts_for(args.online_requests, args.prompt_len, vocab, seed=1234 + i)
                    for i in range(len(args.rates))]
        for mode, start in _servers(args, path).items():
            try:
                proc, url = start()
            except RuntimeError as ex:  # a peer that cannot run here is reported, not fatal
                if mode == "vLLM":
                    print(f"[online {name}] vLLM: skipped ({ex})", file=sys.stderr)
                    continue
                raise
            try:
                import httpx

                model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                asyncio.run(_load(url, model, warm, 4, 100.0))  # warm-up
                for rate, prompts in zip(args.rates, per_rate):
                    res, wall = asyncio.run(_load(url, model, prompts, args.output_len, rate))
                    ttft = [r["ttft"] for r in res]
                    tpot = [r["tpot"] for r in res]
                    rows.append(dict(model=name, rate=rate, engine=mode, requests=len(res),
                                     ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99), tpot_p50=_pct(tpot, 50),
                                     tpot_p99=_pct(tpot, 99),
                                     tokens_per_s=sum(r["tokens"] for r in res) / wall))
                    print(f"[online {name} {mode} rate={rate}] ttft p50 {rows[-1]['ttft_p50']}, "
                          f"tpot p50 {rows[-1]['tpot_p50']}", file=sys.stderr)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return rows


if __name__ == "__main__":
    print("run benchmarks/serve.py --online", file=sys.stderr)
    sys.exit(2)
