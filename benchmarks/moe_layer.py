"""MoE layer: bagualu's ``MoE`` vs transformers' ``MixtralSparseMoeBlock`` under each experts implementation.

Same weights, same inputs, one process run, interleaved repetitions; forward and forward+backward; fp32
and bf16. Prints ms, GFLOP/s (routed expert GEMMs only: 3 GEMMs of 2·D·F per routed row forward, 3× that
forward+backward) and our ratio over the best peer.

    python benchmarks/moe_layer.py                 # T=4096, both shapes, both dtypes
    python benchmarks/moe_layer.py --tokens 512 --reps 2 --json out.json   # a quick run
"""

from __future__ import annotations

import argparse
import os
import sys

from bagualu.utils.openmp import tune_openmp_spin

tune_openmp_spin()  # as the bagualu command does, before torch loads libgomp (both sides of the run get it)

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.moe import MoE  # noqa: E402

SHAPES = {"E8": dict(dim=1024, ffn=2816, E=8, K=2), "E64": dict(dim=512, ffn=512, E=64, K=6)}


def make_pair(dim, ffn, E, K, dtype, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=dim, intermediate_size=ffn, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    ours = MoE(dim, ffn, E, K, router="softmax_topk", norm_topk_prob=True)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_proj.copy_(hf.experts.gate_up_proj[:, :ffn])
        ours.experts.up_proj.copy_(hf.experts.gate_up_proj[:, ffn:])
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    return ours.to(dtype), hf.to(dtype)


def step_fn(module, x, backward: bool, hf: bool):
    def f():
        if backward:
            xi = x.detach().requires_grad_()
            y = module(xi.unsqueeze(0) if hf else xi)
            y.float().square().mean().backward()
            for p in module.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                module(x.unsqueeze(0) if hf else x)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="E8,E64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="eager,grouped_mm,batched_mm",
                    help="transformers experts implementations to compare against")
    ap.add_argument("--json", default=None)
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's defaults (large tensors page-faulted on every call, for both sides)")
    args = ap.parse_args()
    if not args.default_malloc:
        from bagualu.memory.host_allocator import tune_glibc_malloc

        tune_glibc_malloc()
    facts = machine_facts()
    print("machine:", facts)
    rows, headline = [], []
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            x = torch.randn(args.tokens, s["dim"], dtype=dtype)
            for backward in (False, True):
                flops = args.tokens * s["K"] * 3 * 2 * s["dim"] * s["ffn"] * (3 if backward else 1)
                fns, mods = {}, {}
                for impl in args.impls.split(","):
                    # batched_mm gathers a [T*K, F, D] weight copy per call: skip it where that exceeds 8 GB
                    if impl == "batched_mm" and args.tokens * s["K"] * s["ffn"] * s["dim"] * 2 * 2 > 8e9:
                        rows.append({"shape": shape, "dtype": dtype_name, "pass": "fwd+bwd" if backward else "fwd",
                                     "impl": "hf " + impl, "ms": None, "note": "skipped: needs > 8 GB"})
                        continue
                    ours, hf = make_pair(s["dim"], s["ffn"], s["E"], s["K"], dtype, impl)
                    mods["ours"] = ours
                    fns["hf " + impl] = step_fn(hf, x, backward, hf=True)
                fns = {"bagualu": step_fn(mods["ours"], x, backward, hf=False), **fns}
                t = interleaved(fns, reps=args.reps)
                peers = {k: v for k, v in t.items() if k != "bagualu"}
                best = min(peers, key=peers.get)
                ratio = peers[best] / t["bagualu"]
                for k, v in t.items():
                    rows.append({"shape": shape, "dtype": dtype_name, "pass": "fwd+bwd" if backward else "fwd",
                                 "impl": k, "ms": v * 1e3, "GFLOP/s": flops / v / 1e9,
                                 "ratio_vs_best_peer": ratio if k == "bagualu" else None,
                                 "note": "best peer" if k == best else ""})
                headline.append(ratio)
                print_table(rows[-len(t):], ["shape", "dtype", "pass", "impl", "ms", "GFLOP/s", "ratio_vs_best_peer",
                                             "note"])
    print()
    print_table(rows, ["shape", "dtype", "pass", "impl", "ms", "GFLOP/s", "ratio_vs_best_peer", "note"])
    geo = torch.tensor(headline).log().mean().exp().item()
    print(f"\nheadline: bagualu MoE layer vs best transformers experts implementation: geometric mean "
          f"{geo:.2f}x over {len(headline)} cases (min {min(headline):.2f}x, max {max(headline):.2f}x)")
    write_json(args.json, {"machine": facts, "rows": rows, "geomean_ratio": geo})


if __name__ == "__main__":
    main()
