"""Measured all-to-all bandwidth of a process group: the figure FasterMoE's cost model needs.

A collective: every rank of ``group`` must call it. Bytes/s of one rank's outgoing + incoming traffic,
median of a few exchanges of ``nbytes`` per rank after a warm-up (~10 ms on local gloo processes).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def all_to_all_bandwidth(group, nbytes: int = 4 << 20, reps: int = 3, device=None) -> float:
    n = dist.get_world_size(group)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)  # warm-up: connections, buffers
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x, group=group)
        times.append(time.perf_counter() - t0)
    moved = 2 * nbytes * (n - 1) / n  # sent + received, excluding the part that stays local
    # agree on one figure (the slowest rank's) so every rank's plan is identical
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return moved / float(t)
