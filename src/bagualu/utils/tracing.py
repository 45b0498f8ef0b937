"""Running real tensor code while a tracer is active.

Dynamo and AOTAutograd trace under ``FakeTensorMode``, a dispatch mode that turns every tensor operation
into shape propagation. Code that must touch real memory can run in the middle of a trace: a benchmark
the compiler's cost model asks for on first use, or a garbage-collection finaliser that hands a buffer
back to a pool. Inside the mode such code either does nothing and takes no time (a benchmark's copy) or
fails on its real tensors. ``real_tensors()`` sets the active dispatch modes aside for its block.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def real_tensors():
    """Run the block outside every active dispatch mode (fake tensors, proxies), with autograd off."""
    from torch.utils._python_dispatch import _disable_current_modes  # the public API has no equivalent

    with _disable_current_modes(), torch.no_grad():
        yield
