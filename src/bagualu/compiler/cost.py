"""Analytic cost of a kernel under a mapping: bytes moved over bandwidth, weighted ops over peak, overheads.

Shared by every chip: the platform supplies the copy bandwidth and the FLOP/s (``Platform``'s measured,
cached figures); the code generator supplies what is chip-specific (per-thread cache, SIMD lanes, the
cost of starting a parallel region). The model is deliberately simple — its job is to rank mappings
and fusion choices, and measured autotuning corrects it where it is wrong:

- DRAM traffic: every input element the kernel reads, once, and every output element written; a later
  pass over a row re-reads from DRAM only when the row's working set does not fit the per-thread cache.
  When the kernel moves more than the last-level cache, a cached store costs twice (the line is read
  first, write-allocate) unless the mapping streams its stores (non-temporal).
- compute: per element of each pass, the micro-ops it evaluates (transcendentals weighted; libm calls
  weighted as scalar), at the vector throughput the FLOP/s figure implies; materialising a value trades
  its recomputation for a local-buffer read.
- time = max(memory, compute) + half the smaller of the two (they overlap, imperfectly) + the cost of
  forking threads + a per-row, per-pass overhead + the serial finish of column reductions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.ir import Kernel, Mapping, Value

# lane-op weight of each micro-op (an add is 1); libm calls do not vectorise, hence large. exp: ~19 vector
# instructions, ~10 of them on the FMA pipes (ops/csrc/exp_f32.h); was 12 for the 27-instruction Cephes form
WEIGHT = {"exp": 9, "sigmoid": 13, "div": 4, "sqrt": 4, "rsqrt": 5, "reciprocal": 4, "log": 60, "log1p": 60,
          "log2": 60, "expm1": 60, "tanh": 60, "sin": 60, "cos": 60, "erf": 60, "pow": 80, "atan2": 80,
          "load": 1, "const": 0, "index": 1, "local_load": 1, "cast": 1, "where": 1}
STREAM_OPS = 2  # lane-ops per element a streamed store adds (stage, then copy out)
# lane-ops per element of writing a materialised value to its row buffer: a store, which issues at a
# fraction of the ALU rate, and a buffer that competes with the row's inputs for the first-level cache
MAT_STORE_OPS = 3
MAT_SPILL_OPS = 3  # ... more when the row buffers and the row's inputs overflow the first-level cache
ROW_SETUP_ELEMS = 32  # a pass over fewer elements per row pays that fraction of the per-row, per-pass cost
# 16-bit floats are converted in registers: widening is a shift, narrowing rounds to nearest even
# (shift, mask, two adds, NaN select, pack): a bf16 kernel on a CPU without bf16 units is compute-bound
HALF = ("bf16", "f16")
HALF_LOAD_OPS, HALF_STORE_OPS = 2, 8
# ... unless the code generator stages the pass's bf16 stores for the CPU's conversion instruction (the cpp
# stager's converts_staged): a store to the staging chunk and a load back, the conversion itself 1/32 op
STAGED_CVT_OPS = 2


@dataclass(frozen=True)
class Machine:
    bandwidth: float  # bytes/s, whole chip
    lane_ops: float  # vector lane-operations/s, whole chip
    threads: int
    cache_bytes: int  # per thread
    fork_s: float  # cost of one parallel region
    row_s: float  # per row and pass bookkeeping
    call_s: float  # launching one kernel (host-side wrapper, allocation, call)
    llc_bytes: int = 0  # last-level cache; 0 = unknown (write-allocate traffic not modelled)
    l1_bytes: int = 0  # first-level data cache, per core; 0 = unknown (row buffers never spill)
    # (kernel, pass, mapping) -> whether the generator converts the pass's bf16 stores in hardware; None: never
    staged_cvt: Callable[..., bool] | None = None


def machine(gen=None) -> Machine:
    from bagualu.platform import current_platform

    plat = current_platform()
    bw = plat.peak_memory_bandwidth()
    flops = plat.peak_flops(torch.float32)
    return Machine(bandwidth=bw, lane_ops=flops / 2, threads=max(1, torch.get_num_threads()),
                   cache_bytes=getattr(gen, "cache_bytes", lambda: 512 << 10)(),
                   fork_s=getattr(gen, "fork_seconds", 10e-6), row_s=getattr(gen, "row_seconds", 3e-9),
                   call_s=getattr(gen, "call_seconds", 8e-6), llc_bytes=getattr(gen, "llc_bytes", lambda: 0)(),
                   l1_bytes=getattr(gen, "l1_bytes", lambda: 0)(), staged_cvt=getattr(gen, "converts_staged", None))


def _bytes_per_element(k: Kernel, v: Value) -> int:
    if v.op == "load":
        return k.inputs[v.attrs["buf"]].itemsize
    return 0


def traffic(k: Kernel) -> tuple[float, float]:
    """(bytes read, bytes written) of the minimal traffic: each input and output element once."""
    read = sum(b.numel * b.itemsize for b in k.inputs)
    write = sum(b.numel * b.itemsize for b in k.outputs)
    return float(read), float(write)


def predict(k: Kernel, m: Mapping, mc: Machine) -> float:
    passes = sch.schedule(k)
    if m.parallel == "tiles":
        work = min(k.rows * p.space.vars[0].size for p in passes if p.space is not None)
    else:
        work = k.rows if m.parallel == "rows" else 1
    threads = min(mc.threads, work)
    read, write = traffic(k)
    # per-row working set of the loads in each space, to decide whether later passes hit the cache
    row_bytes = {}
    for p in passes:
        if p.space is None:
            continue
        needed = sch.values_needed([it.value for it in p.items])
        b = sum(_bytes_per_element(k, v) for v in needed if k.space_of(v) is p.space) * p.space.numel
        row_bytes[p.space.name] = max(row_bytes.get(p.space.name, 0), b)
    extra = 0.0
    seen_space: set[str] = set()
    ops = 0.0
    mat_done: set[int] = set()
    read_back = set(sch.materialized_outputs(k, passes, m))  # no buffer store for these
    # row buffers (fp32) that do not fit the first-level cache next to the row's inputs: each buffered
    # element is written to and read back from the next level
    buffered = [vid for vid in m.materialize if vid not in read_back]
    mat_row_bytes = sum(4 * sp.numel for sp in (k.space_of(k.values[vid]) for vid in buffered) if sp is not None)
    spill = 0 < mc.l1_bytes < mat_row_bytes + max(row_bytes.values(), default=0)
    for p in passes:
        if p.space is None:
            continue
        needed = [v for v in sch.values_needed([it.value for it in p.items])
                  if k.space_of(v) is p.space and v.op not in sch.ROW_RESULTS]
        if p.space.name in seen_space and row_bytes[p.space.name] > mc.cache_bytes:
            extra += row_bytes[p.space.name] * k.rows
        seen_space.add(p.space.name)
        per_elem = 0.0
        skip: set[int] = set()
        for v in reversed(needed):
            if v.id in skip:
                skip.update(a.id for a in v.args)
                continue
            if v.id in m.materialize and v.id in mat_done:
                per_elem += 1
                skip.update(a.id for a in v.args)
                continue
            per_elem += WEIGHT.get(v.op, 1)
            if v.op == "load" and k.inputs[v.attrs["buf"]].dtype in HALF:
                per_elem += HALF_LOAD_OPS
        fresh = {v.id for v in needed if v.id in m.materialize} - mat_done
        per_elem += (MAT_STORE_OPS + (MAT_SPILL_OPS if spill else 0)) * len(fresh - read_back)
        mat_done |= fresh
        per_elem += len(p.items)
        half = [it for it in p.items if it.kind == "store" and k.outputs[it.obj.buf].dtype in HALF]
        if mc.staged_cvt is not None and mc.staged_cvt(k, p, m):
            bf16 = sum(1 for it in half if k.outputs[it.obj.buf].dtype == "bf16")
            per_elem += HALF_STORE_OPS * (len(half) - bf16) + (0 if m.stream else STAGED_CVT_OPS * bf16)
        else:
            per_elem += HALF_STORE_OPS * len(half)
        if m.stream:  # each stored element is staged, then copied out: a load and a store more
            per_elem += STREAM_OPS * sum(1 for it in p.items if it.kind == "store")
        per_elem += 8 * _unsplit_selects(p, needed)
        lanes_penalty = 8.0 if p.items[0].kind == "topk" or not _affine(k, p, needed) else 1.0
        ops += per_elem * p.space.numel * k.rows * lanes_penalty
    bw = mc.bandwidth * min(1.0, 0.6 * threads) if threads < mc.threads or mc.threads == 1 else mc.bandwidth
    if not m.stream and 0 < mc.llc_bytes < read + write:
        write *= 2  # write-allocate: a cached store reads its line first, and the line is evicted unread
    mem_s = (read + write + extra) / bw
    vec_bonus = 1.1 if m.vector else 1.0
    compute_s = ops / (mc.lane_ops * threads / mc.threads) / vec_bonus
    # per row and pass: a vectorised loop's set-up and finish (masks, horizontal combines); a pass over a
    # few elements is a short unrolled loop with almost none of it (a 6-wide w / w.sum(-1): 32768 rows in
    # two passes took 58 us on one Zen 5 core, where the full charge predicted 200 us more)
    row_passes = sum(min(1.0, (p.space.numel if p.space is not None else 1) / ROW_SETUP_ELEMS) for p in passes)
    overhead = mc.call_s + (mc.fork_s if threads > 1 else 0.0) + mc.row_s * k.rows * row_passes / threads
    # memory and compute overlap, but not perfectly: a row read from memory by one pass and then worked
    # on in cache by the next alternates the two unless the next row is prefetched meanwhile
    space_passes = [p.space.name for p in passes if p.space is not None]
    multipass = len(space_passes) != len(set(space_passes))
    overlap = 0.5 if multipass and not m.prefetch else 0.15
    body = max(mem_s, compute_s) + overlap * min(mem_s, compute_s)
    return body + overhead + _final_phase(k, mc, threads)


def _final_phase(k: Kernel, mc: Machine, threads: int) -> float:
    """Serial work after the row loop: combining per-thread partials, then the final stores."""
    secs = sum(cr.size * threads for cr in k.col_reduces) / (mc.lane_ops / mc.threads)
    one_core_bw = mc.bandwidth * min(1.0, 0.6)
    for fs in k.final_stores:
        n = fs.space.numel if fs.space is not None else 1
        needed = sch.values_needed([fs.value])
        ops = sum(WEIGHT.get(v.op, 1) for v in needed)
        nbytes = sum(_bytes_per_element(k, v) for v in needed) + k.outputs[fs.buf].itemsize
        secs += n * ops / (mc.lane_ops / mc.threads) + n * nbytes / one_core_bw
    return secs


def _unsplit_selects(p, needed: list[Value]) -> int:
    """Index comparisons on the inner variable the code generator cannot remove by splitting the loop."""
    inner = p.space.vars[-1]
    cmps = [v for v in needed if v.op in ("lt", "le", "gt", "ge") and v.args[0].op == "index"
            and inner in v.args[0].attrs["expr"].vars()]
    split = set(sch.split_points(needed, inner))
    return sum(1 for v in cmps if not split or not sch.split_points([v], inner))


def _affine(k: Kernel, p, needed: list[Value]) -> bool:
    """Every address in the pass is affine in the innermost loop variable (so the loop vectorises)."""
    inner = p.space.vars[-1]
    exprs = [v.attrs["expr"] for v in needed if v.op in ("load", "index", "local_load")]
    exprs += [it.obj.index for it in p.items if it.kind in ("store", "colreduce")]
    for e in exprs:
        if not e.linear_in(inner):
            return False
        if any(inner in k.values[a.value_id].deps for a in e.indirects()):
            return False
    return True
