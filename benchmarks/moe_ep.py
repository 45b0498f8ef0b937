"""Expert-parallel MoE layer over local processes: step time, tokens/s and the exposed exchange share,
for the all-to-all and the pipelined (FasterMoE smart) schedules — and DeepSpeed's MoE layer on the
same shape and inputs (top-2, SwiGLU experts; DeepSpeed in its capacity mode, ours dropless) when
DeepSpeed is installed.

    python benchmarks/moe_ep.py                      # EP=2, E=8 shape (dim 1024, ffn 2816, K=2), 4096 tokens/rank
    python benchmarks/moe_ep.py --tokens 1024 --reps 2 --json out.json

The script launches one torchrun job (gloo) per implementation, alternating ours and DeepSpeed
(``--rounds`` times): DeepSpeed's process groups and ours do not share a job well, so each side gets its
own, on the same inputs, one after the other. Figures are the slowest rank's median step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bagualu.utils.openmp import tune_openmp_spin

tune_openmp_spin()  # as the bagualu command does, before torch loads libgomp (both sides of the run get it)

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))


def timed_steps(step, reps):
    from bagualu.comm.timing import exchange_timer

    step()  # warm-up
    times, exch = [], []
    for _ in range(reps):
        dist.barrier()
        with exchange_timer() as t:
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
        times.append(dt)
        exch.append(t.seconds)
    return statistics.median(times), statistics.median(exch)


def ours_layer(args, dtype):
    from bagualu.comm import make_mesh
    from bagualu.moe import MoE
    from bagualu.parallel import parallelize

    torch.manual_seed(0)
    m = MoE(args.dim, args.ffn, args.experts, args.top_k)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return parallelize(m.to(dtype), make_mesh(ep=dist.get_world_size()))


class SwiGLU(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False), \
            nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def deepspeed_layer(args, dtype):
    torch.manual_seed(0)
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE as DSMoE
    except Exception as e:  # not installed or broken: reported, not fatal
        return None, f"deepspeed not available ({type(e).__name__}: {e})"[:160]
    deepspeed.init_distributed(dist_backend="gloo")
    # DeepSpeed's dropless mode (drop_tokens=False) aborts on gloo when ranks route unequal loads (its
    # all-to-all sizes disagree: "Received data size doesn't match"), so it runs in its default capacity
    # mode (factor 1.0, fixed [E, C, D] buffers); ours stays dropless, i.e. does at least as much work.
    layer = DSMoE(hidden_size=args.dim, expert=SwiGLU(args.dim, args.ffn), num_experts=args.experts,
                  ep_size=dist.get_world_size(), k=args.top_k, capacity_factor=1.0, drop_tokens=True,
                  use_rts=False)
    return layer.to(dtype), None


def worker(args):
    dist.init_process_group("gloo")
    rank, _world = dist.get_rank(), dist.get_world_size()
    if not args.default_malloc:
        from bagualu.memory.host_allocator import tune_glibc_malloc

        tune_glibc_malloc()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank)).to(dtype)
        if args.impl == "ours":
            ours = ours_layer(args, dtype)

            def step_ours():
                xi = x.detach().requires_grad_()
                ours(xi).float().square().mean().backward()
                for p in ours.parameters():
                    p.grad = None

            for schedule in ("all_to_all", "pipelined"):
                ours.schedule = schedule
                t, e = timed_steps(step_ours, args.reps)
                rows.append({"impl": f"bagualu ({schedule})", "dtype": dtype_name, "step_s": t, "exchange_s": e})
        else:
            ds, why = deepspeed_layer(args, dtype)
            if ds is None:
                rows.append({"impl": "deepspeed", "dtype": dtype_name, "note": why})
                continue

            def step_ds():
                xi = x.detach().requires_grad_().unsqueeze(0)
                ds(xi)[0].float().square().mean().backward()
                for p in ds.parameters():
                    p.grad = None

            t, _ = timed_steps(step_ds, args.reps)
            rows.append({"impl": "deepspeed", "dtype": dtype_name, "step_s": t, "exchange_s": None})
    for r in rows:
        if "step_s" in r:
            v = torch.tensor([r["step_s"], r["exchange_s"] or 0.0], dtype=torch.float64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            r["step_s"] = float(v[0])
            r["exchange_s"] = float(v[1]) if r["exchange_s"] is not None else None
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def report(args, runs: list[list[dict]]):
    from common import machine_facts, print_table

    merged: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            merged.setdefault((r["impl"], r["dtype"]), []).append(r)
    table = []
    for (impl, dtype), rs in merged.items():
        timed = [r for r in rs if r.get("step_s")]
        if not timed:
            table.append({"impl": impl, "dtype": dtype, "note": rs[0].get("note")})
            continue
        step = statistics.median(r["step_s"] for r in timed)
        exch = [r["exchange_s"] for r in timed if r["exchange_s"] is not None]
        table.append({"impl": impl, "dtype": dtype, "step_s": step, "tokens_per_s": args.nproc * args.tokens / step,
                      "exchange_share": statistics.median(exch) / step if exch else None, "runs": len(timed),
                      "note": next((r["note"] for r in timed if r.get("note")), None)})
    facts = machine_facts()
    print(f"EP={args.nproc} over {args.nproc} gloo processes, {args.tokens} tokens/rank, dim {args.dim}, "
          f"ffn {args.ffn}, E={args.experts}, K={args.top_k}, fwd+bwd; machine: {facts}")
    print_table(table, ["impl", "dtype", "step_s", "tokens_per_s", "exchange_share", "runs", "note"])
    for dtype in args.dtypes.split(","):
        mine = [r for r in table if r["dtype"] == dtype and r["impl"].startswith("bagualu") and r.get("step_s")]
        best = max(mine, key=lambda r: r["tokens_per_s"])
        peer = [r for r in table if r["dtype"] == dtype and r["impl"] == "deepspeed" and r.get("step_s")]
        ratio = f"{best['tokens_per_s'] / peer[0]['tokens_per_s']:.2f}x DeepSpeed" if peer else "no DeepSpeed run"
        print(f"headline {dtype}: bagualu EP={args.nproc} {best['tokens_per_s']:.0f} tokens/s ({best['impl']}), {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "rows": table}, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--default-malloc", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    ap.add_argument("--rounds", type=int, default=1, help="alternating ours/DeepSpeed job pairs")
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if "RANK" in os.environ:
        return worker(args)
    import tempfile

    threads = max(1, (os.cpu_count() or 2) // args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs = []
    impls = ["ours", "deepspeed"] if args.deepspeed else ["ours"]
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for impl in impls:
                out = os.path.join(tmp, f"{impl}-{rnd}.json")
                print(f"[round {rnd + 1}/{args.rounds}] {impl} ...", flush=True)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={args.nproc}", __file__, *sys.argv[1:], "--impl", impl, "--out", out]
                rc = subprocess.call(cmd, env=env)
                if not os.path.exists(out):
                    runs.append([{"impl": "deepspeed" if impl == "deepspeed" else "bagualu", "dtype": d,
                                  "note": f"{impl} job failed (exit {rc})"} for d in args.dtypes.split(",")])
                    continue
                with open(out) as f:
                    rows = json.load(f)
                if rc != 0:  # results were complete; the job died afterwards (e.g. at process-group teardown)
                    for r in rows:
                        r["note"] = f"job exit {rc} after results"
                runs.append(rows)
    report(args, runs)


if __name__ == "__main__":
    main()
