"""Local multi-process launch through PyTorch's elastic launcher (the machinery behind ``torchrun``):
a rendezvous on a free local port, ``nproc`` workers running ``python -m MODULE ARGS``, and up to
``max_restarts`` restarts of the whole worker group when one dies (elastic recovery)."""

from __future__ import annotations

import os


def under_launcher() -> bool:
    """True when this process is already one rank of a launched job (torchrun, Slurm, mpirun...)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_local(module: str, args: list[str], *, nproc: int, max_restarts: int = 0) -> int:
    """Run ``python -m module *args`` as ``nproc`` ranks; returns the job's exit status (0 = all ranks ok)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    launcher_args = parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                                "--module", module, *args])
    try:
        run(launcher_args)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(e.failures.items()))
        print(f"error: the job failed after {max_restarts} restart(s) ({failures})")
        return 1
    return 0
