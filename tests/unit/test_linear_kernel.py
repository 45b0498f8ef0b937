"""The CPU ``linear`` kernel equals ``F.linear`` (fp32 and bf16 weights, bias, odd sizes, strided inputs) and
hands anything it does not cover to the reference."""

import pytest
import torch
import torch.nn.functional as F

from bagualu.ops import kernel, linear_cpu, reference


@pytest.fixture(scope="module")
def fast():
    lib = __import__("bagualu.ops.native", fromlist=["load"]).load("linear_cpu", "linear_cpu.cpp")
    if lib is None:
        pytest.skip("no C++ compiler: the reference is used")
    return linear_cpu.LinearKernel(lib)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 17, 64, 130])
@pytest.mark.parametrize("N,K", [(8, 16), (13, 37), (96, 64), (257, 200)])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_equals_f_linear(fast, M, N, K, wdt):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(wdt)
    b = torch.randn(N, generator=g)
    before = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            ref = F.linear(x, w.float(), b)
            torch.testing.assert_close(fast(x, w, b), ref, rtol=1e-5, atol=1e-5 * K)
            torch.testing.assert_close(fast(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-5 * K)
    finally:
        torch.set_num_threads(before)


def test_batched_and_strided_inputs(fast):
    x = torch.randn(4, 6, 40)[:, ::2]  # [4, 3, 40], non-contiguous rows
    w = torch.randn(24, 40)
    torch.testing.assert_close(fast(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    qkv = torch.randn(5, 100)[:, 10:50]  # a column slice: unit stride, row stride 100
    torch.testing.assert_close(fast(qkv, w), F.linear(qkv, w), rtol=1e-5, atol=1e-4)
    assert fast(torch.randn(0, 40), w).shape == (0, 24)


def test_uncovered_inputs_go_to_the_reference(fast):
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    y = fast(x, w)
    y.sum().backward()  # autograd works: the reference ran
    assert x.grad is not None and w.grad is not None
    xb = torch.randn(3, 16, dtype=torch.bfloat16)
    wb = torch.randn(8, 16, dtype=torch.bfloat16)
    assert fast(xb, wb).dtype == torch.bfloat16
    assert reference.linear(torch.randn(2, 16), wb).dtype == torch.float32  # narrow weights are widened


def test_registered_for_the_cpu_platform():
    assert kernel("linear", "cpu") is linear_cpu.linear
    x, w = torch.randn(3, 32), torch.randn(16, 32)
    torch.testing.assert_close(kernel("linear", "cpu")(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
