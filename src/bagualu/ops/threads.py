"""How many threads the fast kernels use, and running torch's own ops single-threaded around small steps.

Why: at decode batch sizes torch's tiny ops (softmax over 8 router logits, the sampler's index_put, argmax)
still open a 2-thread OpenMP region, and each region waits at its join barrier for the second thread:
a futex wake on a quiet machine, a scheduler time slice (milliseconds) when the other core is busy —
measured in the engine at load 4: 1.6 ms per index_put, 0.23 ms per 8-way softmax. One row gains nothing
from a second thread, so ``small_step`` runs torch's ops on one thread while the kernels that do gain
(the linear kernel's helper threads, paged attention) keep the caller's thread count via ``kernel_threads``.
"""

from __future__ import annotations

import contextlib

import torch

_kernel_threads: int | None = None


def kernel_threads() -> int:
    """Threads a fast kernel may use: the count saved by an enclosing ``small_step``, else torch's."""
    return _kernel_threads or torch.get_num_threads()


@contextlib.contextmanager
def small_step():
    """Inside: ``torch.get_num_threads() == 1``; ``kernel_threads()`` is what torch's count was. Not
    re-entrant across threads (the engine steps from one thread)."""
    global _kernel_threads
    n = torch.get_num_threads()
    if n == 1 or _kernel_threads is not None:
        yield
        return
    _kernel_threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _kernel_threads = None
