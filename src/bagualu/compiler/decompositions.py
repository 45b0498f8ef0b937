"""The decomposition table AOTAutograd traces with: core ATen, plus composite ops split into fusible parts.

Core ATen keeps ``_softmax``, ``_log_softmax``, ``native_layer_norm``, ``gelu`` and ``var`` whole; split, they
become reductions and pointwise ops the partitioner can fuse with their neighbours (and the min-cut
partitioner can then save a row statistic for backward instead of a whole activation). PyTorch's own
decompositions of ``native_layer_norm`` and ``var`` go through ``prims.var``; ours use a two-pass mean and
centred sum of squares in ATen ops, and ``nll_loss_backward`` compares an ``arange`` with the target
instead of scattering into zeros, so every piece is something the IR expresses.
"""

from __future__ import annotations

import functools

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

aten = torch.ops.aten


def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    n = len(normalized_shape)
    dims = list(range(x.dim() - n, x.dim()))
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    mean = torch.mean(xf, dims, keepdim=True)
    xc = xf - mean
    var = torch.mean(xc * xc, dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    out = xc * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    # ATen's CPU kernel returns the statistics in the input dtype, its GPU kernels in fp32
    stat = x.dtype if x.device.type == "cpu" else xf.dtype
    return out.to(x.dtype), mean.to(stat), rstd.to(stat)


def _var(x, dim=None, *, correction=None, keepdim=False):
    dims = list(range(x.dim())) if dim is None or dim == [] else ([dim] if isinstance(dim, int) else list(dim))
    n = 1
    for d in dims:
        n *= x.shape[d]
    c = 1 if correction is None else correction
    mean = torch.mean(x, dims, keepdim=True)
    xc = x - mean
    return torch.sum(xc * xc, dims, keepdim=keepdim) / max(n - c, 0)


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    dims = list(range(x.dim())) if dim is None or dim == [] else ([dim] if isinstance(dim, int) else list(dim))
    return _var(x, dims, correction=correction, keepdim=keepdim), torch.mean(x, dims, keepdim=keepdim)


def _nll_loss_backward(grad_output, self, target, weight, reduction, ignore_index, total_weight):
    t = target.unsqueeze(-1)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    if reduction == 1:  # mean
        g = grad_output / total_weight
    elif reduction == 2:  # sum
        g = grad_output
    else:
        g = grad_output.unsqueeze(-1) if self.dim() > 1 else grad_output
    g = -g
    if weight is not None:
        g = g * weight[safe] if safe.dim() else g * weight[safe]
    g = torch.where(valid, g, torch.zeros_like(g))
    classes = torch.arange(self.shape[-1], device=self.device)
    return torch.where(classes == safe, g, torch.zeros((), dtype=g.dtype, device=self.device)).to(self.dtype)


@functools.cache
def decomposition_table() -> dict:
    table = dict(core_aten_decompositions())
    table.update(get_decompositions([aten._log_softmax, aten._softmax, aten.gelu, aten.gelu_backward,
                                     aten._log_softmax_backward_data, aten._softmax_backward_data,
                                     aten.silu, aten.silu_backward, aten.mse_loss, aten.mse_loss_backward,
                                     aten.hardtanh, aten.leaky_relu, aten.elu]))
    table[aten.native_layer_norm.default] = _native_layer_norm
    table[aten.var.correction] = _var
    table[aten.var_mean.correction] = _var_mean
    table[aten.nll_loss_backward.default] = _nll_loss_backward
    for op in (aten.rsqrt.default, aten.sigmoid.default):
        table.pop(op, None)
    # attention stays with the vendor kernel (flash attention on CPU and GPU), never the math decomposition
    for op in list(table):
        if "scaled_dot_product" in str(op):
            table.pop(op)
    return table
