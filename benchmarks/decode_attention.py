"""Decode attention over a paged KV cache: bagualu's C++ kernel vs gather + SDPA and SDPA on contiguous KV.

One decode step's attention (one query token per sequence) for a batch of S sequences of context L, H query
heads over G KV heads. Contenders, same inputs, one process run, interleaved repetitions, medians:

- ``bagualu paged``: ``ops.kernel("paged_attention")`` (the CPU platform's C++ kernel), into a reused ``out``.
- ``gather+SDPA``: what an engine without a paged kernel does: gather every sequence's blocks into a
  contiguous ``[S, G, L, Dh]`` tensor (into reused buffers), then ``scaled_dot_product_attention``.
- ``SDPA contiguous``: ``scaled_dot_product_attention`` on K/V that are already contiguous per sequence, the
  best case a non-paged engine gets (no gather), with ``enable_gqa``.

The work is memory-bound, so each row reports GB/s of KV bytes read (S·L·G·Dh·2 values) and that figure
as a fraction of this run's copy bandwidth (``dst.copy_(src)`` of 256 MiB, read + write bytes counted).
So that timings come from DRAM rather than the 32 MiB L3 of a small machine, each timed call runs the
step over enough layers (each with its own cache) to touch at least ``--min-mib`` of KV; times are per layer.
torch's idle OpenMP workers spin at most ``GOMP_SPINCOUNT=10000`` rounds after each region
(``bagualu.utils.openmp``, as in the other benchmarks and the ``bagualu`` command) unless the environment sets
a spin or wait policy: with libgomp's default the contenders' spinning workers took the core our kernel's
helper thread needs.

    python benchmarks/decode_attention.py                      # 64x256, 32x1024, 1x4096; fp32 and bf16
    python benchmarks/decode_attention.py --cases 8x128 --reps 3 --json out.json
    python benchmarks/decode_attention.py --threads 1      # every contender single-threaded
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bagualu.utils.openmp import tune_openmp_spin

tune_openmp_spin()  # as the bagualu command does, before torch loads libgomp (both sides of the run get it)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import attention_options, copy_bandwidth, interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.ops import kernel  # noqa: E402
from bagualu.ops.paged_attention_cpu import kernel as cpp_kernel  # noqa: E402


class Case:
    """``layers`` independent paged caches (shuffled block tables) plus the same KV contiguous per sequence."""

    def __init__(self, S, L, H, G, Dh, B, dtype, min_bytes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.S, self.L, self.H, self.G, self.Dh = S, L, H, G, Dh
        self.kv_bytes = S * L * G * Dh * 2 * torch.finfo(dtype).bits // 8
        self.layers = max(1, -(-min_bytes // self.kv_bytes))
        nb = -(-L // B)
        N = S * nb
        self.q_SHDh = torch.randn(S, H, Dh, generator=g).to(dtype)
        self.block_tables = torch.randperm(N, generator=g).int().view(S, nb)
        self.context_lens = torch.full((S,), L, dtype=torch.int32)
        self.qsl = torch.arange(S + 1, dtype=torch.int32)
        self.paged, self.contig = [], []
        for _ in range(self.layers):
            k = torch.randn(N, G, B, Dh, generator=g).to(dtype)
            v = torch.randn(N, G, B, Dh, generator=g).to(dtype)
            self.paged.append((k, v))
            idx = self.block_tables.long()
            self.contig.append(tuple(c[idx].transpose(1, 2).reshape(S, G, nb * B, Dh)[:, :, :L].contiguous()
                                     for c in (k, v)))
        self.out = torch.empty_like(self.q_SHDh)
        self.gk = torch.empty(S, nb, G, B, Dh, dtype=dtype)  # gather buffers, reused like ours reuses out
        self.gv = torch.empty_like(self.gk)
        self.scale = Dh ** -0.5

    def ours(self):
        op = kernel("paged_attention")
        for k, v in self.paged:
            op(self.q_SHDh, k, v, self.block_tables, self.context_lens, self.qsl, self.scale, out=self.out)

    def gather_sdpa(self):
        idx = self.block_tables.long()
        q = self.q_SHDh.unsqueeze(2)
        S, G, L, Dh = self.S, self.G, self.L, self.Dh
        for k, v in self.paged:
            torch.index_select(k, 0, idx.flatten(), out=self.gk.view(-1, *k.shape[1:]))
            torch.index_select(v, 0, idx.flatten(), out=self.gv.view(-1, *v.shape[1:]))
            kc = self.gk.transpose(1, 2).reshape(S, G, -1, Dh)[:, :, :L]
            vc = self.gv.transpose(1, 2).reshape(S, G, -1, Dh)[:, :, :L]
            F.scaled_dot_product_attention(q, kc, vc, scale=self.scale, enable_gqa=True)

    def sdpa_contiguous(self):
        q = self.q_SHDh.unsqueeze(2)
        for k, v in self.contig:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)
        return o.squeeze(2)

    def max_abs_diff(self) -> float:
        """Ours vs SDPA on the last layer (the benchmark times only equal work)."""
        self.ours()
        return (self.out.float() - self.sdpa_contiguous().float()).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    attention_options(ap, "64x256,32x1024,1x4096", "comma-separated SEQSxCONTEXT", reps=15)
    ap.add_argument("--min-mib", type=int, default=256, help="KV touched per timed call (layers x one layer's KV)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine_facts()
    t0 = time.perf_counter()
    native = cpp_kernel()
    facts["kernel_build_or_load_s"] = time.perf_counter() - t0
    facts["kernel"] = "C++ (simd width %d)" % native.simd_width if native else "reference (C++ kernel unavailable)"
    copy_bw = copy_bandwidth()
    facts["copy_GBps_this_run"] = copy_bw / 1e9
    print("machine:", facts)
    rows, headline = [], {}
    cols = ["dtype", "seqs", "ctx", "layers", "impl", "us/layer", "KV GB/s", "frac_copy_bw", "ours_speedup"]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for spec in args.cases.split(","):
            S, L = (int(x) for x in spec.lower().split("x"))
            c = Case(S, L, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, args.min_mib << 20)
            err = c.max_abs_diff()
            if not err < (1e-4 if dtype == torch.float32 else 3e-2):
                raise SystemExit(f"{dtype_name} {spec}: paged kernel differs from SDPA by {err}")
            t = interleaved({"bagualu paged": c.ours, "gather+SDPA": c.gather_sdpa,
                             "SDPA contiguous": c.sdpa_contiguous}, reps=args.reps)
            for impl, sec in t.items():
                per_layer = sec / c.layers
                rows.append({"dtype": dtype_name, "seqs": S, "ctx": L, "layers": c.layers, "impl": impl,
                             "us/layer": per_layer * 1e6, "KV GB/s": c.kv_bytes / per_layer / 1e9,
                             "frac_copy_bw": c.kv_bytes / per_layer / copy_bw,
                             "ours_speedup": None if impl == "bagualu paged" else sec / t["bagualu paged"],
                             "max_abs_diff_vs_sdpa": err if impl == "bagualu paged" else None})
            headline[(dtype_name, spec)] = min(t["gather+SDPA"], t["SDPA contiguous"]) / t["bagualu paged"]
            print_table(rows[-len(t):], cols)
            del c
    print()
    print_table(rows, cols)
    ratios = list(headline.values())
    geo = torch.tensor(ratios).log().mean().exp().item()
    print(f"\nheadline: bagualu paged decode attention vs the faster of gather+SDPA and SDPA on contiguous KV: "
          f"geometric mean {geo:.2f}x over {len(ratios)} cases (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    write_json(args.json, {"machine": facts, "rows": rows, "geomean_ratio": geo,
                           "ratios": {f"{d} {s}": r for (d, s), r in headline.items()}})


if __name__ == "__main__":
    main()
