"""The CPU ``linear`` kernel vs ``torch.nn.functional.linear`` (the BLAS sgemm) at decode batch sizes.

Same inputs, one process run, interleaved repetitions, medians. Shapes are the ~110M Llama's GEMMs
(fused q/k/v, o_proj, fused gate/up, down_proj, LM head); M is the number of rows (sequences decoding
in one step). Reports GFLOP/s, weight GB/s, the fraction of copy bandwidth where memory-bound, and the
ratio. ``bf16 weights`` is our kernel on bf16 weights (fp32 activations) against torch on the fp32 ones;
``bf16 widened + torch`` widens the bf16 weight into a reused fp32 buffer and calls torch (what the kernel
does above ``MAX_ROWS_BF16`` rows).

    python benchmarks/linear.py
    python benchmarks/linear.py --rows 1 8 64 --threads 1 --json out.json
    python benchmarks/linear.py --rows 64 128 256 512 1024                # the bf16 crossover
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.ops import linear_cpu, native  # noqa: E402

SHAPES = {"qkv": (1280, 768), "o_proj": (768, 768), "gate_up": (4096, 768), "down": (768, 2048),
          "lm_head": (32000, 768)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = native.load("linear_cpu", "linear_cpu.cpp")
    if lib is None:
        print("the C++ kernel could not be built; nothing to compare", file=sys.stderr)
        return 1
    kern = linear_cpu.LinearKernel(lib)
    # measure the kernel at every M (the crossovers MAX_ROWS_FP32 and MAX_ROWS_BF16 come from these rows)
    old = linear_cpu.MAX_ROWS_FP32, linear_cpu.MAX_ROWS_BF16
    linear_cpu.MAX_ROWS_FP32 = linear_cpu.MAX_ROWS_BF16 = 1 << 30
    facts = machine_facts()
    print("machine:", facts)
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        w = torch.randn(N, K)
        wb = w.bfloat16()
        for M in args.rows:
            x = torch.randn(M, K)
            inner = max(1, int(2e8 / (M * N * K)))

            def rep(f):
                return lambda: [f() for _ in range(inner)]

            t = interleaved({"torch": rep(lambda: F.linear(x, w)), "ours": rep(lambda: kern(x, w)),
                             "ours bf16 weights": rep(lambda: kern(x, wb)),
                             "bf16 widened + torch": rep(lambda: linear_cpu._widened_gemm(x, wb, None))},
                            reps=args.reps)
            for impl, sec in t.items():
                sec /= inner
                wbytes = N * K * (2 if "bf16" in impl else 4)  # read from memory (widened: 2 + 4 + 4)
                rows.append(dict(shape=name, M=M, impl=impl, ms=sec * 1e3, GFLOPs=2 * M * N * K / sec / 1e9,
                                 weight_GBps=wbytes / sec / 1e9, vs_torch=t["torch"] / t[impl] if impl != "torch"
                                 else 1.0))
    linear_cpu.MAX_ROWS_FP32, linear_cpu.MAX_ROWS_BF16 = old
    print_table(rows, ["shape", "M", "impl", "ms", "GFLOPs", "weight_GBps", "vs_torch"])
    ours = [r["vs_torch"] for r in rows if r["impl"] == "ours"]
    by_m = {}
    for r in rows:
        if r["impl"] == "ours":
            by_m.setdefault(r["M"], []).append(math.log(r["vs_torch"]))
    gm = {m: math.exp(sum(v) / len(v)) for m, v in by_m.items()}
    print("geomean ours/torch by M:", {m: round(v, 2) for m, v in gm.items()})
    print(f"headline: bagualu linear vs torch F.linear (fp32), geomean over shapes and M = "
          f"{math.exp(sum(math.log(v) for v in ours) / len(ours)):.2f}x")
    write_json(args.json, {"machine": facts, "rows": rows, "geomean_by_M": gm})
    return 0


if __name__ == "__main__":
    sys.exit(main())
