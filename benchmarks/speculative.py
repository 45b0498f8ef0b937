"""Speculative decoding by prompt lookup at batch 1: bagualu (``speculative_tokens=K``) vs ``transformers``
``generate`` with its own prompt lookup (``prompt_lookup_num_tokens=K``), each also without it — same
weights, same prompts, greedy, one process run, interleaved repetitions, medians.

Decode tokens/s = (O - 1) / (time of O tokens - time of 1 token), as ``serve.py`` measures batch 1. The
models have random weights, so what a draft hits depends on the prompt: ``random`` is random token ids
(drafts come only from the model's own repetitions), ``repetitive`` repeats one 16-token segment 8 times
(a copy/edit-like prompt). Every pair's greedy tokens are checked equal first (speculation is exact).

    python benchmarks/speculative.py                      # ~110M Llama, K=4, fp32
    python benchmarks/speculative.py --models tiny --reps 1 --tokens 8   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_facts, print_table, write_json  # noqa: E402
from serve import MODELS, make_model_dir  # noqa: E402


class Ours:
    def __init__(self, path, k):
        import bagualu

        self.llm = bagualu.LLM(str(path), dtype="float32", kv_cache_memory=256 << 20, speculative_tokens=k)
        self.sp = lambda n: bagualu.SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)

    def run(self, prompt, n) -> list[int]:
        return self.llm.generate([prompt], self.sp(n), use_tqdm=False)[0].token_ids


class HF:
    def __init__(self, path, k):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.k = k

    @torch.inference_mode()
    def run(self, prompt, n) -> list[int]:
        ids = torch.tensor([prompt])
        extra = {"prompt_lookup_num_tokens": self.k} if self.k else {}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **extra)
        return out[0, ids.shape[1]:].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama"], choices=list(MODELS))
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per timed run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BAGUALU_BENCH_THREADS", "2")))
    facts = machine_facts()
    print("machine:", facts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = make_model_dir(name, Path(tmp))
            vocab = MODELS[name]["vocab_size"]
            g = torch.Generator().manual_seed(7)
            prompts = {"random": torch.randint(3, vocab, (128,), generator=g).tolist(),
                       "repetitive": torch.randint(3, vocab, (16,), generator=g).tolist() * 8}
            impls = {"bagualu": Ours(path, 0), f"bagualu speculative k={args.k}": Ours(path, args.k),
                     "transformers": HF(path, 0), f"transformers prompt lookup k={args.k}": HF(path, args.k)}
            for pname, prompt in prompts.items():
                outs = {k: e.run(prompt, args.tokens) for k, e in impls.items()}  # warm-up and the check
                ref = outs["bagualu"]
                for k, toks in outs.items():
                    if toks != ref:
                        print(f"warning: {k}'s greedy tokens differ from bagualu's on the {pname} prompt",
                              file=sys.stderr)
                full = {k: [] for k in impls}
                one = {k: [] for k in impls}
                for _ in range(args.reps):
                    for k, e in impls.items():
                        t0 = time.perf_counter()
                        e.run(prompt, 1)
                        one[k].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        e.run(prompt, args.tokens)
                        full[k].append(time.perf_counter() - t0)
                tps = {k: (args.tokens - 1) / max(statistics.median(full[k]) - statistics.median(one[k]), 1e-9)
                       for k in impls}
                for k in impls:
                    peer = "transformers prompt lookup" if "speculative" in k or "lookup" in k else "transformers"
                    peer_k = next(p for p in impls if p.startswith(peer))
                    rows.append(dict(model=name, prompt=pname, impl=k, decode_tokens_per_s=tps[k],
                                     vs_plain_same_impl=tps[k] / tps["bagualu" if k.startswith("bagualu")
                                                                     else "transformers"],
                                     vs_peer=tps[k] / tps[peer_k] if k.startswith("bagualu") else None))
            for e in impls.values():
                if isinstance(e, Ours):
                    e.llm.close()
    print_table(rows, ["model", "prompt", "impl", "decode_tokens_per_s", "vs_plain_same_impl", "vs_peer"])
    spec = [r for r in rows if r["impl"].startswith("bagualu speculative")]
    print("headline: bagualu speculative vs transformers prompt lookup (batch-1 decode): "
          + ", ".join(f"{r['prompt']} {r['vs_peer']:.2f}x" for r in spec))
    write_json(args.json, {"machine": facts, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
