"""``ops.threads.small_step``: torch's ops on one thread inside, the kernels keep the caller's count; restored
on exit (also on an exception); an engine step under it equals one without."""

from __future__ import annotations

import pytest
import torch

from bagualu.ops import threads

pytestmark = pytest.mark.unit


def test_small_step_saves_and_restores_thread_counts():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.small_step():
            assert torch.get_num_threads() == 1 and threads.kernel_threads() == 2
            with threads.small_step():  # nested: unchanged
                assert torch.get_num_threads() == 1 and threads.kernel_threads() == 2
        assert torch.get_num_threads() == 2 and threads.kernel_threads() == 2
        with pytest.raises(RuntimeError), threads.small_step():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2 and threads.kernel_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_kernels_inside_small_step_match_outside():
    from bagualu.ops import kernel, linear_cpu

    x, w = torch.randn(3, 300), torch.randn(500, 300)
    want = torch.nn.functional.linear(x, w)
    before, mw = torch.get_num_threads(), linear_cpu.MIN_WORK_PER_THREAD
    torch.set_num_threads(2)
    linear_cpu.MIN_WORK_PER_THREAD = 1
    try:
        with threads.small_step():
            got = kernel("linear", "cpu")(x, w)
    finally:
        torch.set_num_threads(before)
        linear_cpu.MIN_WORK_PER_THREAD = mw
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
