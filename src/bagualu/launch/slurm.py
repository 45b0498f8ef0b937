"""Slurm: a job started with ``srun`` has SLURM_* variables; torch.distributed wants RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Map them (never overriding what a launcher already set)."""

from __future__ import annotations

import os


def adopt_slurm_env(environ: dict | None = None) -> bool:
    """Fill the torch.distributed variables from Slurm's; True if it did."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True
