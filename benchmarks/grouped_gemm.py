"""The CPU grouped GEMM (``ops.gemm_cpu``) vs one ``torch.mm`` per problem (the BLAS sgemm), MoE shapes.

Same inputs, one process run, interleaved repetitions, medians. Each case is one group as the MoE experts
issue it (``moe.experts``): every expert's slice of routed rows against its weight, in the forward (x @
W_gate.T and x @ W_up.T, then a @ W_down.T) and the weight gradients (dY.T @ a): 8 experts of dim 1024 /
ffn 2816 with 1024 rows each (Mixtral-shaped), 64 experts of dim 512 / ffn 512 with 384 rows each (6 of
64 routed). Prints GFLOP/s and the ratio. bf16: our kernel reads bf16 operands as stored; the peer widens
them to fp32 first (its bf16 GEMM has no hardware path on CPUs without bf16 units), as
``ops.reference.grouped_mm`` does there.

    python benchmarks/grouped_gemm.py
    python benchmarks/grouped_gemm.py --dtypes float32 --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.ops import gemm_cpu, reference  # noqa: E402

SHAPES = {"E8": (8, 1024, 1024, 2816), "E64": (64, 384, 512, 512)}  # experts, rows each, dim, ffn


def groups(E, R, D, F, dtype, g):
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, wg, wu, wd = r(E * R, D), r(E, F, D), r(E, F, D), r(E, D, F)
    a, dy = r(E * R, F), r(E * R, D)
    gate, up = torch.empty(E * R, F, dtype=dtype), torch.empty(E * R, F, dtype=dtype)
    y, dwd = torch.empty(E * R, D, dtype=dtype), torch.empty(E, D, F, dtype=dtype)
    sl = [(e, e * R, (e + 1) * R) for e in range(E)]
    return {
        "fwd gate+up": [(x[s:t], w[e].t(), o[s:t], False) for e, s, t in sl for w, o in ((wg, gate), (wu, up))],
        "fwd down": [(a[s:t], wd[e].t(), y[s:t], False) for e, s, t in sl],
        "bwd dW_down": [(dy[s:t].t(), a[s:t], dwd[e], False) for e, s, t in sl],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", type=int, default=None, help="rows per expert (default: the shape's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if gemm_cpu._loaded() is None:
        print("the C++ kernel could not be built; nothing to compare", file=sys.stderr)
        return 1
    facts = machine_facts()
    print("machine:", facts)
    rows, ratios = [], []
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            E, R, D, F = SHAPES[shape]
            for case, problems in groups(E, args.rows or R, D, F, dtype, g).items():
                flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _, _ in problems)
                t = interleaved({"ours": lambda p=problems: gemm_cpu.grouped_mm(p),
                                 "torch.mm": lambda p=problems: reference.grouped_mm(p)}, args.reps)
                ratios.append(t["torch.mm"] / t["ours"])
                for impl, sec in t.items():
                    rows.append({"shape": shape, "dtype": str(dtype).replace("torch.", ""), "case": case, "impl": impl,
                                 "ms": sec * 1e3, "GFLOPs": flops / sec / 1e9,
                                 "vs_torch": t["torch.mm"] / sec})
                print(f"  {shape} {dtype} {case}: ours {t['ours'] * 1e3:.1f} ms, torch.mm {t['torch.mm'] * 1e3:.1f} ms",
                      flush=True)
    print_table(rows, ["shape", "dtype", "case", "impl", "ms", "GFLOPs", "vs_torch"])
    geo = torch.tensor(ratios).log().mean().exp().item()
    print(f"headline: grouped GEMM vs torch.mm per expert, geomean {geo:.2f}x over {len(ratios)} cases "
          f"(min {min(ratios):.2f}x)")
    write_json(args.json, {"machine": facts, "rows": rows, "geomean": geo})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
