"""Opt-in accounting of time spent blocked in token exchanges (for benchmarks and the cost model).

Off by default; the hot path pays one attribute read. ``with exchange_timer() as t: ...`` then
``t.seconds`` is the wall time the calling thread spent blocked in MoE exchanges (all-to-all calls, or
waiting on the pipelined schedule's transfers — i.e. the exchange time *not* hidden behind compute).
"""

from __future__ import annotations

import contextlib
import time


class _Timer:
    active: "_Timer | None" = None

    def __init__(self):
        self.seconds = 0.0


@contextlib.contextmanager
def exchange_timer():
    t = _Timer()
    prev, _Timer.active = _Timer.active, t
    try:
        yield t
    finally:
        _Timer.active = prev


@contextlib.contextmanager
def blocked():
    """Wrap a blocking exchange; counts only while an ``exchange_timer`` is active."""
    t = _Timer.active
    if t is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        t.seconds += time.perf_counter() - t0
