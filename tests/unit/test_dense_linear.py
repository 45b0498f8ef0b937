"""``ops.dense``: the linear layer whose GEMMs go through the platform's grouped GEMM, against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bagualu.ops import dense, gemm_cpu


def grads(fn, x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b)
    (y.square().sum() + y.sum()).backward()
    return [y.detach(), x.grad, w.grad] + ([] if b is None else [b.grad])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(300, 96), (2, 150, 96)])
def test_equals_f_linear_forward_and_backward(bias, shape):
    g = torch.Generator().manual_seed(len(shape) + bias)
    x, w = torch.randn(*shape, generator=g), torch.randn(80, 96, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    assert dense._use_native(x, w, b) == (gemm_cpu._loaded() is not None)
    for got, want in zip(grads(dense.linear, x, w, b), grads(F.linear, x, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item() ** 0.5)


def test_native_path_is_taken_for_training_batches(monkeypatch):
    """The platform's kernel runs all three GEMMs (forward, then dx and dW as one job)."""
    if gemm_cpu._loaded() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    calls = []
    native = dense._native_grouped_mm()
    monkeypatch.setattr(dense, "_native_grouped_mm", lambda: lambda p: (calls.append(len(p)), native(p)))
    x, w = torch.randn(256, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
    dense.linear(x, w).sum().backward()
    assert calls == [1, 2]


def test_small_batches_autocast_and_half_precision_stay_on_f_linear():
    w = torch.randn(32, 64)
    assert not dense._use_native(torch.randn(8, 64), w, None)  # a decode step's few rows
    assert not dense._use_native(torch.randn(512, 64).bfloat16(), w.bfloat16(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dense._use_native(torch.randn(512, 64), w, None)
        y = dense.linear(torch.randn(512, 64), w)
    assert y.dtype == torch.bfloat16  # autocast's F.linear


def test_linear_module_is_nn_linear_with_the_same_state_dict():
    m = dense.Linear(16, 8, bias=True)
    assert isinstance(m, torch.nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(200, 16)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
