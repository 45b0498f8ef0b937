"""Serving throughput: bagualu's engine (R-part in-process and in R-workers) vs transformers, same weights.

Offline mode (default), one process run, interleaved repetitions:
  - generated tokens/s (prefill included) for R requests × P prompt × O output tokens (greedy, no early
    stop), for: ours in-process, ours with R-workers, transformers ``generate`` on one static batch, and
    transformers' continuous-batching ``generate_batch`` when this version has it, llama.cpp
    (batched decoding through llama-cpp-python, same weights as GGUF: ``llama_cpp_peer.py``) when
    ``llama-cpp-python`` and ``gguf`` are installed, and vLLM's CPU build (``vllm_peer.py``: a worker
    under its own virtual environment's interpreter, ``.venv-vllm``) when that environment exists;
  - batch-1 decode tokens/s (decode only: the time of O tokens minus the time of 1) against the
    memory-bandwidth bound, weight bytes per token ÷ the copy bandwidth measured in the same run.
Online mode (``--online``): ``bagualu serve`` in a subprocess and a Poisson load generator over HTTP at
fixed request rates; TTFT and TPOT p50/p99 from the streamed chunks.

    python benchmarks/serve.py                                   # ~110M Llama + small Mixtral, fp32 + bf16
    python benchmarks/serve.py --models llama --dtypes float32 --requests 32 --reps 1
    python benchmarks/serve.py --dtypes bfloat16 --requests 32 --output-len 64 --r-workers --widened
    python benchmarks/serve.py --online --rates 1 2 4            # needs bagualu serve
    python benchmarks/serve.py --tiny --json out.json            # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bagualu.utils.openmp import tune_openmp_spin

tune_openmp_spin()  # as the bagualu command does, before torch loads libgomp (both sides of the run get it)

import torch

sys.path.insert(0, os.path.dirname(__file__))
import llama_cpp_peer  # noqa: E402
import vllm_peer  # noqa: E402
from common import copy_bandwidth, machine_facts, print_table, write_json  # noqa: E402

MODELS = {
    # the issue's ~110M Llama and a small Mixtral
    "llama": dict(arch="llama", vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, intermediate_size=2048),
    "mixtral": dict(arch="mixtral", vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
}


def make_model_dir(name: str, root: Path) -> Path:
    import transformers

    from bagualu.models.byte_tokenizer import byte_level_tokenizer

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    path = root / name
    if (path / "config.json").exists():
        return path
    cfg_cls = {"llama": transformers.LlamaConfig, "mixtral": transformers.MixtralConfig}[arch]
    cfg = cfg_cls(max_position_embeddings=2048, **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    byte_level_tokenizer().save(path)
    return path


def weight_bytes_per_token(path: Path, dtype: torch.dtype) -> int:
    """Bytes of weights one decode token reads: all but the embedding table; MoE layers only top-k experts."""
    from bagualu.models import from_pretrained

    m = from_pretrained(path, device="meta", dtype=dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, p in m.named_parameters():
        if name == "model.embed_tokens.weight" and not m.config.tie_word_embeddings:
            continue
        n = p.numel()
        if ".experts." in name and m.config.moe is not None:
            n = n * m.config.moe.top_k // m.config.moe.num_experts
        total += n * elt
    return total


def prompts_for(n: int, length: int, vocab: int, seed: int = 1234) -> list[list[int]]:
    """``n`` random prompts; each seed gives prompts no other seed shares a prefix with (in practice), so a
    run on fresh prompts never finds them in an engine's prefix cache from an earlier run."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


class Ours:
    def __init__(self, path, dtype, **opts):
        import bagualu

        self.llm = bagualu.LLM(str(path), dtype=dtype, **opts)
        self.SP = bagualu.SamplingParams

    def run(self, prompts, out_len) -> int:
        return sum(len(t) for t in self.generate(prompts, out_len))

    def generate(self, prompts, out_len) -> list[list[int]]:
        sp = self.SP(temperature=0, max_tokens=out_len, min_tokens=out_len, ignore_eos=True)
        return [list(o.token_ids) for o in self.llm.generate(prompts, sp, use_tqdm=False)]

    def close(self):
        self.llm.close()


class HFStatic:
    """transformers ``generate`` on one static batch (prompts are equal length: no padding waste)."""

    def __init__(self, path, dtype):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    @torch.inference_mode()
    def run(self, prompts, out_len) -> int:
        ids = torch.tensor(prompts)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                                  min_new_tokens=out_len, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    def close(self):
        pass


class HFContinuous(HFStatic):
    """transformers' continuous-batching API (``generate_batch``), when this version has it."""

    @staticmethod
    def available() -> bool:
        import transformers

        return hasattr(transformers.GenerationMixin, "generate_batch")

    @torch.inference_mode()
    def run(self, prompts, out_len) -> int:
        import transformers

        gc = transformers.GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                                           eos_token_id=-1, pad_token_id=0)
        res = self.model.generate_batch(inputs=prompts, generation_config=gc, progress_bar=False)
        return sum(len(r.generated_tokens) for r in res.values())


def offline(args, root: Path) -> tuple[list[dict], list[dict]]:
    rows, b1_rows = [], []
    agree: dict[tuple[str, str], int] = {}
    for name in args.models:
        path = make_model_dir(name, root)
        vocab = MODELS[name]["vocab_size"]
        # warm-up and checks on prompts of their own, and fresh prompts for every repetition: our engine
        # keeps a prefix cache across generate calls, the peers do not, and a timed run must not reuse it
        warm = prompts_for(4, args.prompt_len, vocab, seed=1)
        reps = [prompts_for(args.requests, args.prompt_len, vocab, seed=1234 + r) for r in range(args.reps)]
        # a peer's context limit: the longest run, throughput's or batch-1's (vLLM stops a sequence there)
        max_len = args.prompt_len + max(args.output_len, 0 if args.no_batch1 else args.batch1_tokens) + 8
        for dt_name in args.dtypes:
            dtype = getattr(torch, dt_name)
            engines = {"bagualu in-process": lambda: Ours(path, dt_name)}
            if args.widened and dtype != torch.float32:  # A/B: the half weights widened to fp32 at load
                engines["bagualu in-process, weights fp32"] = lambda: Ours(path, dt_name, gemm_dtype="float32")
            for w in args.r_workers:
                engines[f"bagualu r-workers={w}"] = (lambda w=w: Ours(path, dt_name, r_workers=w))
            engines["transformers static batch"] = lambda: HFStatic(path, dtype)
            if HFContinuous.available() and not args.no_hf_continuous:
                engines["transformers generate_batch"] = lambda: HFContinuous(path, dtype)
            if not args.no_llama_cpp and llama_cpp_peer.available():
                gguf = llama_cpp_peer.write_gguf(path, root / f"{name}-{dt_name}.gguf", dtype)
                engines["llama.cpp"] = lambda: llama_cpp_peer.LlamaCpp(
                    gguf, max_seqs=args.requests, max_len=max_len)
            if not args.no_vllm and vllm_peer.available(args.vllm_python):
                engines["vLLM"] = lambda: vllm_peer.VllmCpu(
                    path, dt_name, max_seqs=max(256, args.requests), max_len=max_len,
                    python=args.vllm_python)
            built = {}
            for k, make in engines.items():
                try:
                    e = make()
                    e.run(warm[:2], 2)  # warm-up: first-call costs (kernel build, allocator)
                    built[k] = e
                except Exception as ex:  # a peer that cannot run here is reported, not fatal
                    print(f"[{name} {dt_name}] {k}: skipped ({type(ex).__name__}: {ex})", file=sys.stderr)
            # a peer's load of the same weights, checked by its output: the common greedy prefix over 4 prompts x
            # 16 tokens (one prompt alone can open on a near-tie, a random model's top-2 logits 2e-3 apart, which
            # bf16 rounding in either engine flips)
            peers = [p for p in ("llama.cpp", "vLLM") if p in built]
            ours = built["bagualu in-process"].generate(warm, 16) if peers and "bagualu in-process" in built else None
            for peer in peers if ours is not None else ():
                agree[(name, dt_name, peer)] = sum(llama_cpp_peer.agreement(a, b) for a, b in zip(
                    ours, built[peer].generate(warm, 16)))
                print(f"[{name} {dt_name}] {peer} greedy tokens equal to ours: "
                      f"{agree[(name, dt_name, peer)]} of {16 * len(warm)}", file=sys.stderr)
            times: dict[str, list[float]] = {k: [] for k in built}
            counts: dict[str, int] = {}
            for prompts in reps:
                for k, e in built.items():
                    t0 = time.perf_counter()
                    counts[k] = e.run(prompts, args.output_len)
                    times[k].append(time.perf_counter() - t0)
                    print(f"[{name} {dt_name}] {k}: {counts[k] / times[k][-1]:.1f} tokens/s", file=sys.stderr)
            base = None
            for k in built:
                tps = counts[k] / statistics.median(times[k])
                if k == "transformers static batch":
                    base = tps
                rows.append(dict(model=name, dtype=dt_name, engine=k, tokens=counts[k],
                                 seconds=statistics.median(times[k]), tokens_per_s=tps))
                if (name, dt_name, k) in agree:
                    rows[-1]["greedy_agree_4x16"] = agree[(name, dt_name, k)]
            peer_tps = {p: next((r["tokens_per_s"] for r in rows if r["model"] == name and r["dtype"] == dt_name
                                 and r["engine"] == p), None) for p in ("llama.cpp", "vLLM")}
            for r in rows:
                if r["model"] == name and r["dtype"] == dt_name:
                    if base:
                        r["vs_hf_static"] = r["tokens_per_s"] / base
                    if peer_tps["llama.cpp"]:
                        r["vs_llama_cpp"] = r["tokens_per_s"] / peer_tps["llama.cpp"]
                    if peer_tps["vLLM"]:
                        r["vs_vllm"] = r["tokens_per_s"] / peer_tps["vLLM"]
            if not args.no_batch1:
                b1_rows += batch1(built, name, dt_name, dtype, path,
                                  prompts_for(2 * args.reps, args.prompt_len, vocab, seed=4321), args)
            for e in built.values():
                e.close()
    return rows, b1_rows


def batch1(built, name, dt_name, dtype, path, prompts, args) -> list[dict]:
    """Decode-only tokens/s of one sequence: (time of n tokens - time of 1) / (n - 1), each timed run on a prompt
    of its own (``prompts``: two per repetition, shared by the engines), so no prefix cache serves one run's
    prefill and not the other's. Each run must generate all its tokens: vLLM stops a sequence at its context
    limit, and when that limit was sized for the throughput runs' output its batch-1 rate came out at
    2-2.9x the memory-bandwidth bound."""
    bw = copy_bandwidth()  # measured now, not the platform's cached figure: this box's bandwidth drifts with load
    bound = bw / weight_bytes_per_token(path, dtype)
    out = []
    n = args.batch1_tokens
    for k, e in built.items():
        if "generate_batch" in k:
            continue
        full, one = [], []
        for r in range(args.reps):
            t0 = time.perf_counter()
            got = e.run([prompts[2 * r]], 1)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got += e.run([prompts[2 * r + 1]], n)
            full.append(time.perf_counter() - t0)
            if got != 1 + n:  # an engine that stopped early would look fast
                raise RuntimeError(f"{k}: {got} tokens generated for batch-1 runs of 1 and {n}")
        tps = (n - 1) / max(statistics.median(full) - statistics.median(one), 1e-9)
        out.append(dict(model=name, dtype=dt_name, engine=k, decode_tokens_per_s=tps, bound_tokens_per_s=bound,
                        fraction_of_bound=tps / bound, copy_GBps=bw / 1e9))
    lcpp = next((r["decode_tokens_per_s"] for r in out if r["engine"] == "llama.cpp"), None)
    for r in out:
        if lcpp:
            r["vs_llama_cpp"] = r["decode_tokens_per_s"] / lcpp
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama", "mixtral"], choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--r-workers", type=int, nargs="*", default=[1])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batch1-tokens", type=int, default=64)
    ap.add_argument("--no-batch1", action="store_true")
    ap.add_argument("--no-hf-continuous", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true",
                    help="skip the llama.cpp peer (run when llama-cpp-python and gguf are installed)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM peer (run when its environment exists)")
    ap.add_argument("--vllm-python", default=None,
                    help=f"the interpreter of vLLM's environment (default: {vllm_peer.DEFAULT_PYTHON})")
    ap.add_argument("--widened", action="store_true",
                    help="half dtypes: also our engine with the weights widened to fp32 (gemm_dtype=float32)")
    ap.add_argument("--online", action="store_true", help="HTTP load generator against bagualu serve")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="requests/s (online mode)")
    ap.add_argument("--online-requests", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny model, few requests")
    ap.add_argument("--model-root", default=None, help="where the random models are saved (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.models, args.dtypes = ["tiny"], args.dtypes[:1]
        args.requests, args.prompt_len, args.output_len, args.batch1_tokens = 4, 16, 8, 8
        args.online_requests, args.rates = 4, args.rates[:1]
    from bagualu.memory.host_allocator import tune_glibc_malloc

    tune_glibc_malloc()  # what our engine does when it starts; the peers run in this process with it too
    facts = machine_facts()
    print("machine:", facts)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.model_root) if args.model_root else Path(tmp)
        if args.online:
            from serve_online import online

            rows = online(args, root, make_model_dir)
            print_table(rows, ["model", "rate", "engine", "requests", "ttft_p50", "ttft_p99", "tpot_p50",
                               "tpot_p99", "tokens_per_s"])
            write_json(args.json, {"machine": facts, "online": rows})
            return 0
        rows, b1 = offline(args, root)
    print(f"\noffline: {args.requests} requests x {args.prompt_len} prompt x {args.output_len} output tokens, "
          f"greedy, generated tokens/s including prefill")
    print_table(rows, ["model", "dtype", "engine", "tokens", "seconds", "tokens_per_s", "vs_hf_static",
                       "vs_llama_cpp", "vs_vllm", "greedy_agree_4x16"])
    if b1:
        print(f"\nbatch 1, decode only ({args.batch1_tokens} tokens); bound = copy bandwidth / weight bytes per token")
        print_table(b1, ["model", "dtype", "engine", "decode_tokens_per_s", "bound_tokens_per_s",
                         "fraction_of_bound", "copy_GBps", "vs_llama_cpp"])
    write_json(args.json, {"machine": facts, "args": vars(args), "offline": rows, "batch1": b1})
    best = [r for r in rows if r["engine"].startswith("bagualu") and r.get("vs_hf_static")]
    if best:
        top = max(best, key=lambda r: r["vs_hf_static"])
        print(f"\nheadline: bagualu / transformers static batch = {top['vs_hf_static']:.2f}x "
              f"({top['model']} {top['dtype']}, {top['engine']}, {top['tokens_per_s']:.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
