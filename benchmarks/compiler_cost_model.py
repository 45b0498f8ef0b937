"""How close PowerFusion's cost model comes to the best mapping, measured, on compiler_fusion.py's kernels.

For each case of ``compiler_fusion.py`` (same inputs, dtypes and thread counts) the compiler runs as usual;
then every fused kernel it built is compiled once more under *every* candidate mapping the code generator
offers (parallel split, SIMD width, materialisation, prefetch, streamed stores) and each is timed
(``search.measure``: synthetic inputs, interleaved repetitions, medians). A kernel's *regret* is the time
of the mapping the model picks (the cheapest prediction, as ``search.choose`` ranks them) over the time of
the fastest candidate. Prints one row per kernel and the headline: the geometric-mean regret and how many
picks are within 10% of the best. This is what ``BAGUALU_COMPILER_AUTOTUNE=1`` would gain over the model
on these kernels (it measures the model's top 4), and the yardstick for changes to ``compiler/cost.py``.

    python benchmarks/compiler_cost_model.py                       # all cases, fp32 + bf16, 1 and 2 threads
    python benchmarks/compiler_cost_model.py --cases softmax,router --dtypes float32 --threads 1 --reps 3

Timings move with the machine's memory-bandwidth regime between processes; the candidates of one kernel
are timed together, in one process, so their ratios are what matters.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_facts, print_table, write_json  # noqa: E402
from compiler_fusion import case_parser, cases, parse_case_args  # noqa: E402

from bagualu.compiler import cost, search  # noqa: E402


def kernels_of(step, fn, inputs) -> list:
    """(kernel, code generator) of every kernel the compiler builds for one call of ``step``."""
    seen, choose = [], search.choose

    def spy(k, gen):
        seen.append((k, gen))
        return choose(k, gen)

    search.choose = spy
    try:
        torch._dynamo.reset()
        step(torch.compile(fn, backend="powerfusion"), *inputs)
    finally:
        search.choose = choose
    return seen


def regret_rows(name: str, dname: str, threads: int, kernels: list, reps: int) -> list[dict]:
    rows = []
    for k, gen in kernels:
        cands = gen.candidates(k)
        mc = cost.machine(gen)
        preds = [cost.predict(k, m, mc) for m in cands]
        times = search.measure(k, gen, cands, reps=reps)
        pick = min(range(len(cands)), key=lambda i: (preds[i], i))
        best = min(range(len(cands)), key=times.__getitem__)
        rows.append({"case": name, "dtype": dname, "threads": threads, "kernel": k.name, "candidates": len(cands),
                     "pick": cands[pick].key(), "best": cands[best].key(), "pick_ms": times[pick] * 1e3,
                     "best_ms": times[best] * 1e3, "predicted_ms": preds[pick] * 1e3,
                     "regret": times[pick] / times[best]})
        print(f"  {name} {dname} {threads}t {k.name}: {len(cands)} mappings, pick {cands[pick].key()} "
              f"{times[pick] * 1e3:.3f} ms, best {cands[best].key()} {times[best] * 1e3:.3f} ms", flush=True)
    return rows


def main() -> None:
    args = parse_case_args(case_parser(__doc__))
    from bagualu.memory.host_allocator import tune_glibc_malloc

    tune_glibc_malloc()  # as compiler_fusion.py: no candidate pays page faults on fresh outputs
    facts = machine_facts()
    print("machine:", facts)
    rows: list[dict] = []
    for dname in args.dtypes.split(","):
        for nt in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(nt)
            all_cases = cases(args.scale, getattr(torch, dname))
            names = list(all_cases) if args.cases == "all" else args.cases.split(",")
            for name in names:
                if name not in all_cases:
                    raise SystemExit(f"--cases: unknown {name!r}; known: {', '.join(all_cases)}")
                fn, inputs, _nbytes, step = all_cases[name]
                rows += regret_rows(name, dname, nt, kernels_of(step, fn, inputs), args.reps)
    print_table(rows, ["case", "dtype", "threads", "kernel", "candidates", "pick", "best", "pick_ms", "best_ms",
                       "predicted_ms", "regret"])
    geo = math.exp(sum(math.log(r["regret"]) for r in rows) / len(rows)) if rows else None
    within = sum(r["regret"] <= 1.1 for r in rows)
    if geo is not None:
        print(f"headline: cost model regret geomean {geo:.3f} over {len(rows)} kernels; "
              f"{within} picks within 10% of the best measured mapping")
    write_json(args.json, {"facts": facts, "rows": rows, "geomean_regret": geo, "within_10pct": within})


if __name__ == "__main__":
    main()
