"""A linear layer whose GEMMs — forward, input gradient, weight gradient — run on the platform's own grouped GEMM.

``linear(x, w, b)`` is ``F.linear`` with the same autograd. Where the platform registers a native
``grouped_mm`` (the CPU platform's packed AVX2/AVX-512 kernel, ``ops/gemm_cpu.py``) and the call is a
training-sized fp32 one, the three GEMMs go through it: on this project's AVX-512 CPU it runs fp32 at about
twice the BLAS's rate (``benchmarks/grouped_gemm.py``), and the backward's two GEMMs are one job. Elsewhere
— a platform without its own kernel, autocast (bf16 GEMMs, where the vendor library is already at the
bf16 peak), few rows (decoding, where the platform's ``linear`` GEMV is the fast path), or a trace under
``torch.compile`` — it is ``F.linear`` itself.

``Linear`` is ``nn.Linear`` with that forward: same parameters, same state-dict names, same init.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagualu.ops import reference
from bagualu.ops.registry import kernel

MIN_ROWS = 128  # fewer rows than this (decode steps, tiny batches): F.linear


def _native_grouped_mm():
    gm = kernel("grouped_mm")
    return None if gm is reference.grouped_mm else gm


def _use_native(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    return (not torch.compiler.is_compiling() and x.dtype == torch.float32 and w.dtype == torch.float32
            and (b is None or b.dtype == torch.float32) and x.device == w.device
            and not torch.is_autocast_enabled(x.device.type) and x.dim() >= 2
            and x.numel() >= MIN_ROWS * w.shape[1] and _native_grouped_mm() is not None)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        x2 = x.reshape(-1, x.shape[-1])
        out = x2.new_empty(x2.shape[0], w.shape[0])
        if b is not None:
            out.copy_(b.expand_as(out))
        _native_grouped_mm()([(x2, w.t(), out, b is not None)])
        ctx.save_for_backward(x2, w)
        ctx.has_bias = b is not None
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, w.shape[0])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = x2.new_empty(x2.shape) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        problems = ([(dy2, w, dx, False)] if dx is not None else []) + ([(dy2.t(), x2, dw, False)] if dw is not None else [])
        if problems:
            _native_grouped_mm()(problems)  # one job: the two outputs are disjoint
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (None if dx is None else dx.view(*dy.shape[:-1], x2.shape[1])), dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + b`` (``F.linear``), through the platform's grouped GEMM where that pays (see the module doc)."""
    if _use_native(x, w, b):
        return _Linear.apply(x, w, b)
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
