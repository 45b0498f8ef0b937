"""Prefill attention over a paged KV cache: bagualu's C++ kernel vs SDPA, and its prefill tiles vs its row path.

One layer's attention for a batch of S prompts being prefilled: each sequence's query rows are the last n of
its L positions (n = L: a whole prompt; n < L: a chunk after a cached prefix), causal, H query heads over G
KV heads. Contenders, same inputs, one process run, interleaved repetitions, medians:

- ``bagualu paged``: ``ops.kernel("paged_attention")`` (the CPU platform's C++ kernel; on AVX-512 CPUs its
  prefill tiles, ``csrc/paged_attention_tiles.h``), into a reused ``out``.
- ``bagualu rows``: the same kernel built with ``-DBGL_NO_TILES``: prefill chunks on the decode path's row
  items (what every prefill ran on before the tiles), for the record.
- ``SDPA contiguous``: ``scaled_dot_product_attention`` per sequence on K/V already contiguous (its CPU flash
  kernel, ``enable_gqa``; causal by ``is_causal`` for whole prompts, a bottom-right mask for chunks).
- ``gather+SDPA``: what an engine without a paged kernel does: gather the sequence's blocks, then SDPA.

The work is compute-bound (every key is reused by every later query), so each row reports GFLOP/s of the
causal attention (4 · Dh FLOPs per query head and visible key: QK and PV). The headline is the geometric
mean of the faster SDPA's time over ours, and of the row path's over the tiles'.

    python benchmarks/prefill_attention.py                       # 16x128, 4x512, 1x2048, 8x640+128; fp32, bf16
    python benchmarks/prefill_attention.py --cases 4x512 --dtypes bfloat16 --threads 1 --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

from bagualu.utils.openmp import tune_openmp_spin

tune_openmp_spin()  # as the bagualu command does, before torch loads libgomp (both sides of the run get it)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import attention_options, interleaved, machine_facts, print_table, write_json  # noqa: E402

from bagualu.ops import linear_cpu, native, paged_kv  # noqa: E402
from bagualu.ops.paged_attention_cpu import PagedAttentionKernel  # noqa: E402
from bagualu.ops.paged_attention_cpu import kernel as cpp_kernel  # noqa: E402


def row_path_kernel() -> PagedAttentionKernel | None:
    """The kernel built without its prefill tiles (None where no compiler is available)."""
    lib = native.load("paged_attention_cpu_rows", "paged_attention_cpu.cpp", ("-DBGL_NO_TILES",))
    if lib is None:
        return None
    linear_cpu.share_helpers(lib, "bgl_adopt_helpers")
    return PagedAttentionKernel(lib)


class Case:
    """S sequences of context L whose last n positions are queries, in a paged cache (shuffled block tables)
    and contiguous per sequence."""

    def __init__(self, S, L, n, H, G, Dh, B, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.S, self.L, self.n, self.H, self.G, self.Dh = S, L, n, H, G, Dh
        nb = -(-L // B)
        self.block_tables = torch.randperm(S * nb, generator=g).int().view(S, nb)
        self.context_lens = torch.full((S,), L, dtype=torch.int32)
        self.qsl = torch.arange(0, S * n + 1, n, dtype=torch.int32)
        self.q = torch.randn(S * n, H, Dh, generator=g).to(dtype)
        self.k = torch.randn(S * nb, G, B, Dh, generator=g).to(dtype)
        self.v = torch.randn(S * nb, G, B, Dh, generator=g).to(dtype)
        idx = self.block_tables.long()
        self.kc, self.vc = (c[idx].transpose(1, 2).reshape(S, G, nb * B, Dh)[:, :, :L].contiguous()
                            for c in (self.k, self.v))
        self.out = torch.empty_like(self.q)
        self.scale = Dh ** -0.5
        p = torch.arange(L - n, L)[:, None]
        self.mask = None if n == L else (torch.arange(L)[None, :] <= p)  # bottom-right causal
        self.flops = 4 * H * Dh * S * sum(range(L - n + 1, L + 1))

    def args(self):
        return (self.q, self.k, self.v, self.block_tables, self.context_lens, self.qsl, self.scale)

    def paged(self, k: PagedAttentionKernel):
        return lambda: k(*self.args(), out=self.out)

    def _sdpa(self, s, kk, vv):
        q = self.q[s * self.n:(s + 1) * self.n].transpose(0, 1).unsqueeze(0)
        if self.mask is None:
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=self.scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=self.mask, scale=self.scale, enable_gqa=True)

    def sdpa_contiguous(self):
        return [self._sdpa(s, self.kc[s:s + 1], self.vc[s:s + 1]) for s in range(self.S)]

    def gather_sdpa(self):
        for s in range(self.S):
            kk = paged_kv.gather_kv(self.k, self.block_tables[s], self.L).unsqueeze(0)
            vv = paged_kv.gather_kv(self.v, self.block_tables[s], self.L).unsqueeze(0)
            self._sdpa(s, kk, vv)

    def max_abs_diff(self, k: PagedAttentionKernel) -> float:
        ours = k(*self.args()).float()
        ref = torch.cat([o[0].transpose(0, 1) for o in self.sdpa_contiguous()]).float()
        return (ours - ref).abs().max().item()


def parse_case(spec: str) -> tuple[int, int, int]:
    """SxL (whole prompts) or SxL+n (the last n of L positions)."""
    s, rest = spec.lower().split("x")
    L, _, n = rest.partition("+")
    return int(s), int(L), int(n) if n else int(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    attention_options(ap, "16x128,4x512,1x2048,8x640+128", "comma-separated SxL or SxL+n", reps=9)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine_facts()
    ours, rows_k = cpp_kernel(), row_path_kernel()
    if ours is None:
        raise SystemExit("the C++ kernel is unavailable here (no compiler?): nothing to measure")
    facts["kernel"] = f"C++ (simd width {ours.simd_width}, prefill tiles {ours.prefill_tiles})"
    print("machine:", facts)
    rows, vs_sdpa, vs_rows = [], [], []
    cols = ["dtype", "seqs", "ctx", "queries", "impl", "ms", "GFLOP/s", "ours_speedup"]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for spec in args.cases.split(","):
            S, L, n = parse_case(spec)
            c = Case(S, L, n, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype)
            err = c.max_abs_diff(ours)
            if not err < (1e-4 if dtype == torch.float32 else 3e-2):
                raise SystemExit(f"{dtype_name} {spec}: paged kernel differs from SDPA by {err}")
            fns = {"bagualu paged": c.paged(ours)}
            if rows_k is not None:
                fns["bagualu rows"] = c.paged(rows_k)
            fns.update({"SDPA contiguous": c.sdpa_contiguous, "gather+SDPA": c.gather_sdpa})
            t = interleaved(fns, reps=args.reps, rotate=True)
            for impl, sec in t.items():
                rows.append({"dtype": dtype_name, "seqs": S, "ctx": L, "queries": n, "impl": impl, "ms": sec * 1e3,
                             "GFLOP/s": c.flops / sec / 1e9,
                             "ours_speedup": None if impl == "bagualu paged" else sec / t["bagualu paged"],
                             "max_abs_diff_vs_sdpa": err if impl == "bagualu paged" else None})
            vs_sdpa.append(min(t["SDPA contiguous"], t["gather+SDPA"]) / t["bagualu paged"])
            if "bagualu rows" in t:
                vs_rows.append(t["bagualu rows"] / t["bagualu paged"])
            print_table(rows[-len(t):], cols)
    print()
    print_table(rows, cols)

    def geo(xs):
        return torch.tensor(xs).log().mean().exp().item() if xs else None

    print(f"\nheadline: bagualu paged prefill attention vs the faster of SDPA contiguous and gather+SDPA: geometric "
          f"mean {geo(vs_sdpa):.2f}x over {len(vs_sdpa)} cases (min {min(vs_sdpa):.2f}x)"
          + (f"; prefill tiles vs the row path: {geo(vs_rows):.2f}x (min {min(vs_rows):.2f}x)" if vs_rows else ""))
    write_json(args.json, {"machine": facts, "rows": rows, "geomean_vs_sdpa": geo(vs_sdpa),
                           "geomean_tiles_vs_rows": geo(vs_rows)})


if __name__ == "__main__":
    main()
