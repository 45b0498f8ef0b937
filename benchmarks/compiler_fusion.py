"""PowerFusion vs eager vs Inductor on the LLM memory-bound subgraphs, fp32 and bf16, 1 and 2 threads.

One process run, same inputs for the three, interleaved repetitions (the order rotating, every timed call
after an untimed read that leaves the cache cold and clean: ``common.cache_scrubber``), medians. Cases:
residual add + RMSNorm (both outputs), SwiGLU activation, rotary embedding on q and k, softmax over a
32000-wide vocabulary, cross-entropy forward and forward+backward, the MoE router (softmax over 64
experts, top-6, renormalise, per-expert counts), LayerNorm forward+backward. For each: ms, effective GB/s
of the *minimal* traffic (each input read and each output written once per phase; a backward re-reads what
it needs), that as a fraction of the copy bandwidth measured in this run at the same thread count, and the
compile time (first call, including Dynamo and AOTAutograd). The last line is the headline: geometric
mean of Inductor's time over PowerFusion's.

    python benchmarks/compiler_fusion.py                      # all cases, both dtypes, 1 and 2 threads
    python benchmarks/compiler_fusion.py --scale 0.25 --reps 3 --cases rmsnorm,router --json out.json

Allocator: glibc malloc with its mmap/trim thresholds raised (``bagualu.memory.tune_glibc_malloc``) for
all three, so no side pays page faults on fresh >32 MiB outputs; ``--default-malloc`` keeps glibc's
defaults (then every large fresh output is faulted in on each call, for eager and Inductor; PowerFusion
pools its large outputs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import cache_scrubber, copy_bandwidth, interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.ops.reference import apply_rope  # noqa: E402

V, E, K = 32000, 64, 6


def rmsnorm(x, r, w):
    h = x + r
    hf = h.float()
    return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def swiglu(g, u):
    return F.silu(g) * u


def softmax(x):
    return torch.softmax(x, dim=-1)


def cross_entropy(x, t):
    return F.cross_entropy(x.float(), t)




def router(logits):
    p = logits.float().softmax(-1)
    w, i = p.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = i.flatten()
    counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=logits.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    return w, i, counts


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def fwd_bwd(fn, n_grad, grad_out=None):
    """A training step of ``fn``: forward, then the gradients of the first ``n_grad`` inputs.

    Only ``fn`` is what gets compiled (as in training, where the loop calls backward); ``grad_out`` is
    the incoming gradient (None: the output is a scalar loss).
    """
    def step(f, *inputs):
        leaves = [t.detach().requires_grad_() for t in inputs[:n_grad]]
        out = f(*leaves, *inputs[n_grad:])
        return torch.autograd.grad(out, leaves, grad_out)
    return step


def _size(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cases(scale: float, dtype: torch.dtype):
    """name -> (fn, inputs, minimal bytes, step): ``step(compiled_fn, *inputs)`` runs one timed call."""
    T = max(8, int(2048 * scale))
    D, Fd = 4096, 11008
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    out = {}
    x, res, w = r(T, D), r(T, D), r(D)
    call = lambda f, *a: f(*a)  # noqa: E731
    out["rmsnorm"] = (rmsnorm, [x, res, w], 4 * _size(x) + _size(w), call)
    gg, u = r(max(8, T // 2), Fd), r(max(8, T // 2), Fd)
    out["swiglu"] = (swiglu, [gg, u], 3 * _size(gg), call)
    B, S, H, G, Dh = 2, max(8, T // 2), 32, 8, 128
    q, k, cos, sin = r(B, H, S, Dh), r(B, G, S, Dh), r(B, S, Dh), r(B, S, Dh)
    out["rope"] = (apply_rope, [q, k, cos, sin], 2 * _size(q, k) + _size(cos, sin), call)
    Tv = max(8, T // 2)
    logits = r(Tv, V) * 2
    tgt = torch.randint(0, V, (Tv,), generator=g)
    out["softmax"] = (softmax, [logits], 2 * _size(logits), call)
    out["ce_fwd"] = (cross_entropy, [logits, tgt], _size(logits, tgt) + 4, call)
    # forward reads the logits; backward reads them again (or what it saved) and writes their gradient
    out["ce_fwd_bwd"] = (cross_entropy, [logits, tgt], 3 * _size(logits) + 2 * _size(tgt), fwd_bwd(cross_entropy, 1))
    Tr = max(64, T * 16)
    rl = torch.stack([torch.randperm(E, generator=g) for _ in range(Tr)]).to(dtype) * 0.125 - 4  # no ties
    out["router"] = (router, [rl], _size(rl) + Tr * K * (4 + 8) + E * 8, call)
    xl, wl, bl, dy = r(T, D), r(D), r(D), r(T, D)
    stats = 2 * T * 4
    # forward: x -> y (+ row statistics); backward: dy, x, statistics -> dx, dw, db
    out["layernorm_fwd_bwd"] = (layer_norm, [xl, wl, bl], 5 * _size(xl) + 2 * stats + 5 * _size(wl),
                                fwd_bwd(layer_norm, 3, dy))
    return out


def first_call(fn, args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def case_parser(doc: str) -> argparse.ArgumentParser:
    """The options that select this suite's cases (shared with compiler_cost_model.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="token-count multiplier (1.0: T=2048, D=4096)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", default="all")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", default=None)
    return ap


def parse_case_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if args.scale <= 0:
        raise SystemExit(f"--scale={args.scale} must be positive")
    return args


def main() -> None:
    ap = case_parser(__doc__)
    ap.add_argument("--peers", default="eager,inductor", help="comma list from: eager, inductor")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc defaults (see above)")
    args = parse_case_args(ap)
    peers = [p for p in args.peers.split(",") if p]
    bad = set(peers) - {"eager", "inductor"}
    if bad:
        raise SystemExit(f"--peers: unknown {sorted(bad)}; choose from eager, inductor")
    if not args.default_malloc:
        from bagualu.memory.host_allocator import tune_glibc_malloc

        tune_glibc_malloc()
    facts = machine_facts()
    print("machine:", facts)
    scrub = cache_scrubber()
    rows, ratios = [], []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        for nt in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(nt)
            torch._dynamo.reset()
            copy_bw = copy_bandwidth()
            all_cases = cases(args.scale, dtype)
            names = list(all_cases) if args.cases == "all" else args.cases.split(",")
            for name in names:
                if name not in all_cases:
                    raise SystemExit(f"--cases: unknown {name!r}; known: {', '.join(all_cases)}")
                fn, inputs, nbytes, step = all_cases[name]
                impls = {"powerfusion": torch.compile(fn, backend="powerfusion")}
                if "inductor" in peers:
                    impls["inductor"] = torch.compile(fn)
                if "eager" in peers:
                    impls["eager"] = fn
                compile_s = {k: first_call(lambda *a, f=f: step(f, *a), inputs) for k, f in impls.items()}
                med = interleaved({k: (lambda f=f: step(f, *inputs)) for k, f in impls.items()}, reps=args.reps,
                                  warmup=1, between=scrub, rotate=True)
                for k, s in med.items():
                    rows.append({"case": name, "dtype": dname, "threads": nt, "impl": k, "ms": s * 1e3,
                                 "GBps": nbytes / s / 1e9, "copy_frac": nbytes / s / copy_bw,
                                 "compile_s": compile_s[k] if k != "eager" else None,
                                 "vs_inductor": med["inductor"] / s if "inductor" in med else None})
                if "inductor" in med:
                    ratios.append(med["inductor"] / med["powerfusion"])
                print(f"  {name} {dname} {nt}t: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items()),
                      flush=True)
            rows.append({"case": "(copy)", "dtype": dname, "threads": nt, "impl": "copy_", "GBps": copy_bw / 1e9,
                         "copy_frac": 1.0})
    print_table(rows, ["case", "dtype", "threads", "impl", "ms", "GBps", "copy_frac", "compile_s", "vs_inductor"])
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None
    worst = min(ratios) if ratios else None
    print(f"allocator: {facts['allocator']}; load average (1 min) at start {facts['load_avg_1m']:.2f}")
    if geo is not None:
        print(f"headline: powerfusion vs inductor geomean {geo:.2f}x over {len(ratios)} cases "
              f"(worst {worst:.2f}x)")
    else:
        print("headline: powerfusion vs inductor not measured (--peers without inductor)")
    write_json(args.json, {"facts": facts, "rows": rows, "geomean_vs_inductor": geo, "worst_vs_inductor": worst})


if __name__ == "__main__":
    main()
