"""GNU OpenMP's idle spin, shortened where our kernels' helper threads share the cores with torch's team.

After each parallel region, libgomp's workers spin before they sleep (``GOMP_SPINCOUNT``, 300,000 rounds
by default: a fraction of a millisecond). Our C++ kernels run on their own helper threads
(``ops/csrc/helpers.h``), so a torch op followed by one of ours leaves torch's idle worker spinning on the
core our helper needs. Measured on a 2-core Zen 5, the tiny-moe training step (``benchmarks/train_step.py``):
fp32 528 → 361 ms and bf16 autocast 371 → 288 ms with 10,000 rounds (1,000 and 10,000 were best of
0..100,000); the ``transformers`` loop in the same process did not change (608–657 and 549–569 ms).

libgomp reads the variable once, when torch loads it, so ``tune_openmp_spin`` must run before ``import torch``
in a process — the ``bagualu`` command does it first thing, and so does the training worker's entry point
(``bagualu.train.entry``, for ranks that torchrun or Slurm start) — or in a parent whose environment the
process inherits (the workers ``bagualu train --nproc`` launches). A library user who imports torch first
sets ``GOMP_SPINCOUNT=10000`` themselves. An explicit ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is never overridden.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"


def tune_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process and its children unless the user chose a spin or wait policy;
    returns whether it was set."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def openmp_settings() -> dict[str, str | None]:
    """The variables that decide how torch's OpenMP threads wait (for reports: ``bagualu info``, benchmarks)."""
    return {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
