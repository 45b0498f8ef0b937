"""Checkpointing: how long a training step stalls for a synchronous vs an asynchronous checkpoint (as a
share of the step), and save / load GB/s of bagualu's checkpoints vs ``torch.save`` / ``torch.load`` of the
same state — one process run, interleaved repetitions, medians.

The state is what ``bagualu train`` checkpoints: model parameters + AdamW moments of a recipe's model,
after real steps of ``bagualu.train.loop.train_step``. Measured:
- step: one training step without checkpointing;
- stall, sync: the time ``CheckpointManager.save`` blocks with ``async_save=False`` (DCP write, fsync,
  per-rank sha256, manifest, rename);
- stall, async: the time ``save`` blocks with ``async_save=True`` (handing the previous checkpoint's
  commit to the background, starting the staging copy, the write and the hash in background threads),
  and, separately, the extra time of the following steps while those threads run (the optimizer step
  waits for the staging copy; on a CPU machine the copy, serialisation and hashing share the cores and
  the memory bus with the step);
- save GB/s: state bytes / time of a synchronous ``save`` vs ``torch.save`` + ``fsync`` (the same
  durability); load GB/s: ``CheckpointManager.load`` (DCP, into the live tensors) vs ``torch.load`` +
  ``copy_`` into them. Files are read back from the page cache on both sides.

    python benchmarks/checkpoint.py                              # tiny-moe state
    python benchmarks/checkpoint.py --shape mixtral-140m --batch 4 --seq 256
    python benchmarks/checkpoint.py --layers 1 --batch 2 --seq 32 --reps 1 --json out.json   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_facts, print_table, write_json  # noqa: E402
from train_step import shape  # noqa: E402

from bagualu.checkpoint import CheckpointManager  # noqa: E402
from bagualu.comm import make_mesh  # noqa: E402
from bagualu.models import from_config  # noqa: E402
from bagualu.parallel import parallelize  # noqa: E402
from bagualu.train.config import TrainConfig  # noqa: E402
from bagualu.train.loop import make_optimizer, train_step  # noqa: E402


def training_state(model, opt) -> dict[str, torch.Tensor]:
    """The tensors of ``TrainingState.state_dict`` in one process: parameters and AdamW state."""
    sd = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            sd[f"optim.{n}.{k}"] = v
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny-moe", help="tiny-moe (default) or mixtral-140m")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (smoke runs)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (median reported)")
    ap.add_argument("--steps-after", type=int, default=3, help="steps timed after an async save (its write overlaps)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bagualu.memory.host_allocator import tune_glibc_malloc

    tune_glibc_malloc()  # as bagualu train does
    cfg, batch, seq = shape(args.shape)
    batch, seq = args.batch or batch, args.seq or seq
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    facts = machine_facts()
    print("machine:", facts)
    t = TrainConfig(steps=10_000, warmup=10, global_batch=batch, seq_len=seq, dtype="float32")
    mesh = make_mesh(dp=1, ep=1)
    model = parallelize(from_config(cfg, device="cpu", dtype="float32", seed=0), mesh).train()
    opt, sched = make_optimizer(model, t)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step():
        train_step(model, lambda: ids, opt, sched, t, mesh, __import__("contextlib").nullcontext)

    step()  # AdamW state exists after the first step
    sd = training_state(model, opt)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"state: {len(sd)} tensors, {nbytes / 1e6:.1f} MB (parameters + AdamW moments)")
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    sync_mgr = CheckpointManager(root / "sync", keep=1, async_save=False)
    async_mgr = CheckpointManager(root / "async", keep=1, async_save=True)
    async_mgr.guard(opt)  # as the loop does: the optimizer step waits for an async save's staging copy
    m = {k: [] for k in ("step", "stall_sync", "stall_async", "after_async", "torch_save", "dcp_load", "torch_load")}
    n = 0
    for rep in range(args.reps + 1):  # rep 0 warms up (first writes, page faults) and is not recorded
        keep = rep > 0

        def timed(key, fn):
            t0 = time.perf_counter()
            out = fn()
            if keep:
                m[key].append(time.perf_counter() - t0)
            return out

        for _ in range(args.steps_after):
            timed("step", step)
        n += 1
        timed("stall_sync", lambda: sync_mgr.save(n, sd))
        step()
        timed("stall_async", lambda: async_mgr.save(n, sd))  # commits the previous async save first
        t0 = time.perf_counter()
        for _ in range(args.steps_after):
            step()
        if keep:  # extra time per checkpoint of the steps that overlap the background write
            m["after_async"].append(max(0.0, time.perf_counter() - t0 - args.steps_after * statistics.median(m["step"])))
        path = root / "torch.pt"

        def torch_save():
            with open(path, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
        timed("torch_save", torch_save)
        latest = sync_mgr.latest(verify=False)
        timed("dcp_load", lambda: sync_mgr.load(sd, latest))

        def torch_load():
            loaded = torch.load(path, weights_only=True)
            with torch.no_grad():
                for k, v in sd.items():
                    v.copy_(loaded[k])
        timed("torch_load", torch_load)
    async_mgr.close()
    sync_mgr.close()
    med = {k: statistics.median(v) for k, v in m.items()}
    step_s = med["step"]
    gb = nbytes / 1e9
    rows = [
        {"what": "train step (no checkpoint)", "ms": step_s * 1e3, "share_of_step": 1.0},
        {"what": "stall: sync checkpoint (bagualu)", "ms": med["stall_sync"] * 1e3,
         "share_of_step": med["stall_sync"] / step_s, "GB/s": gb / med["stall_sync"]},
        {"what": "stall: async checkpoint, blocking part", "ms": med["stall_async"] * 1e3,
         "share_of_step": med["stall_async"] / step_s},
        {"what": "async: extra time of the overlapping steps", "ms": med["after_async"] * 1e3,
         "share_of_step": med["after_async"] / step_s},
        {"what": "save: torch.save + fsync", "ms": med["torch_save"] * 1e3, "GB/s": gb / med["torch_save"]},
        {"what": "load: bagualu (DCP, in place)", "ms": med["dcp_load"] * 1e3, "GB/s": gb / med["dcp_load"]},
        {"what": "load: torch.load + copy_", "ms": med["torch_load"] * 1e3, "GB/s": gb / med["torch_load"]},
    ]
    print(f"\n{args.shape}: state {nbytes / 1e6:.1f} MB, step {batch}x{seq} tokens, {args.reps} reps (medians)")
    print_table(rows, ["what", "ms", "share_of_step", "GB/s"])
    async_share = med["stall_async"] / step_s
    save_ratio, load_ratio = med["torch_save"] / med["stall_sync"], med["torch_load"] / med["dcp_load"]
    print(f"\nheadline: async checkpoint stall {100 * async_share:.1f}% of a step vs sync "
          f"{100 * med['stall_sync'] / step_s:.1f}% (+{100 * med['after_async'] / step_s:.1f}% on the steps sharing the "
          f"CPU with the background write); save {gb / med['stall_sync']:.2f} GB/s ({save_ratio:.2f}x torch.save), load "
          f"{gb / med['dcp_load']:.2f} GB/s ({load_ratio:.2f}x torch.load); target async stall <= 5%")
    write_json(args.json, {"machine": facts, "shape": args.shape, "state_bytes": nbytes, "rows": rows,
                           "medians_s": med, "async_stall_share": async_share,
                           "async_overlap_share": med["after_async"] / step_s, "save_ratio_vs_torch": save_ratio,
                           "load_ratio_vs_torch": load_ratio})
    tmp.cleanup()


if __name__ == "__main__":
    main()
