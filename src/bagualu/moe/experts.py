"""SwiGLU experts stored as stacked weights, run over the contiguous per-expert slices of a dispatch.

Legend: E experts (local to this rank), D model dim, F expert FFN dim, N routed rows (sorted by expert).

Weights: ``gate_proj [E, F, D]``, ``up_proj [E, F, D]``, ``down_proj [E, D, F]`` — the per-expert
``nn.Linear`` layout stacked, so a Hugging Face checkpoint's ``experts.{e}.*`` tensors load by index
and expert parallelism shards the leading dim.

The compute is one ``autograd.Function`` (``SwiGLUExperts``) rather than autograd over a Python loop:
- every stacked weight always gets a gradient (zeros for experts that saw no token), which the
  bucketed gradient synchronisation relies on — autograd over slices would skip an idle shard;
- backward recomputes ``silu(g) * u`` from the saved pre-activations instead of saving it (one [N, F]
  buffer less per layer), and runs the three weight-gradient GEMMs per expert straight into slices of
  the stacked gradients (no per-expert allocation, no ``cat``); the element-wise work is the platform's
  ``silu_mul`` (one pass forward; on CPU one C pass, two ATen passes in the reference) and, backward,
  ``silu_mul`` again and ``silu_mul_backward`` (du and dg in one pass; five ATen passes in the reference).
  Gate and up stay two GEMMs: one ``[2F, D]`` GEMM against their concatenation measured slower here at
  F = 1024 (and no faster at 512) and costs a weight copy.

Each pass's per-expert GEMMs are one call of the platform's ``grouped_mm`` (forward: gate and up, then down;
backward: da and dW_down, then dx's gate term with dW_gate and dW_up, then dx's up term): on CPU one job
that keeps every core busy to the last expert and reads bf16 operands as stored; the reference runs one
``torch.mm`` each, half-precision ones on the fp32 units where the platform measures them slower
(``gemm_via_fp32``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from bagualu.memory import workspace
from bagualu.ops import kernel
from bagualu.ops.reference import gemm_via_fp32


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast compute dtype active for ``x``'s device, if any (custom Functions see fp32 otherwise)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def cast_for_autocast(x, *weights):
    """Inputs in the autocast dtype (fp32 master weights → bf16 compute), or unchanged without autocast."""
    dt = autocast_dtype(x)
    if dt is None or dt == x.dtype and all(w.dtype == dt for w in weights):
        return (x, *weights)
    if gemm_via_fp32(dt, x.device.type):  # the GEMMs run on fp32 units: no round trip of the weights through dt
        return (x.to(dt), *weights)
    return (x.to(dt), *(w.to(dt) for w in weights))


def _gemms(problems) -> None:
    """``out (+)= a @ b`` for every ``(a, b, out, accumulate)``: the platform's grouped GEMM (on CPU one job over
    every expert's slice, bf16 operands read as stored), else one ``torch.mm`` each, through fp32 where
    ``gemm_via_fp32`` says so (``ops.reference.grouped_mm``)."""
    kernel("grouped_mm")(problems)


def _slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _fresh(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def experts_forward(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, counts: list[int], keep: bool = True,
                    pooled: bool = True):
    """``(y_ND, saved)``: expert e applied to its slice; ``saved`` is what ``experts_backward`` needs.

    The pre-activations in ``saved`` (``saved[1:]``) come from the workspace pool; the caller hands them
    back with ``release_when_freed`` once nothing can backpropagate through them any more. Without
    ``keep`` nothing is saved. ``pooled=False``: ordinary tensors instead, for callers that save them with
    ``save_for_backward`` (so activation checkpointing can drop them).
    """
    take = workspace.take if pooled else _fresh
    N, F_ = x_ND.shape[0], w_gate_EFD.shape[1]
    g_NF = take((N, F_), x_ND.dtype, x_ND.device)
    u_NF = take((N, F_), x_ND.dtype, x_ND.device)
    _gemms([(x_ND[s:t], w[e].t(), o[s:t], False) for e, s, t in _slices(counts)
            for w, o in ((w_gate_EFD, g_NF), (w_up_EFD, u_NF))])
    silu_mul = kernel("silu_mul")
    if keep:  # a = silu(g) · u in a pool buffer; g stays for the backward
        a_NF = silu_mul(g_NF, u_NF, out=workspace.take((N, F_), x_ND.dtype, x_ND.device))
    else:
        a_NF = silu_mul(g_NF, u_NF, out=g_NF)
    y_ND = x_ND.new_empty(N, w_down_EDF.shape[1])
    _gemms([(a_NF[s:t], w_down_EDF[e].t(), y_ND[s:t], False) for e, s, t in _slices(counts)])
    if keep:
        workspace.give(a_NF)
        return y_ND, (x_ND, g_NF, u_NF)
    if pooled:
        workspace.give(g_NF, u_NF)
    return y_ND, None


def release_when_freed(ctx, *pool_tensors: torch.Tensor) -> None:
    """Return pool tensors when the autograd node ``ctx`` dies — after the last backward through it (so
    ``retain_graph=True`` and double backward stay correct), or when the graph is dropped without one."""
    weakref.finalize(ctx, workspace.give, *pool_tensors)


def _idle_zeroed(t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Zero the slices of experts that saw no row (the GEMMs write every other slice in full)."""
    for e, n in enumerate(counts):
        if not n:
            t[e].zero_()
    return t


def experts_backward(saved, w_gate, w_up, w_down, counts: list[int], dy_ND, need_dx: bool = True,
                     dx_out: torch.Tensor | None = None):
    """``(dx_ND, dw_gate, dw_up, dw_down)`` for one ``experts_forward`` call (dx None unless ``need_dx``).

    ``saved`` is only read (a retained graph may backpropagate again); temporaries come from the pool.
    """
    x_ND, g_NF, u_NF = saved
    dy_ND = dy_ND.contiguous()
    shape, dt, dev = g_NF.shape, g_NF.dtype, g_NF.device
    a_NF = kernel("silu_mul")(g_NF, u_NF, out=workspace.take(shape, dt, dev))
    da_NF = workspace.take(shape, dt, dev)
    dw_down = _idle_zeroed(torch.empty_like(w_down), counts)
    _gemms([p for e, s, t in _slices(counts)
            for p in ((dy_ND[s:t], w_down[e], da_NF[s:t], False), (dy_ND[s:t].t(), a_NF[s:t], dw_down[e], False))])
    # du = da · silu(g) over a, dg = da · u · silu'(g) over da: neither is needed any more
    du_NF, dg_NF = kernel("silu_mul_backward")(da_NF, g_NF, u_NF, du_out=a_NF, dg_out=da_NF)
    dx_ND = (dx_out if dx_out is not None else x_ND.new_empty(x_ND.shape)) if need_dx else None
    dw_gate = _idle_zeroed(torch.empty_like(w_gate), counts)
    dw_up = _idle_zeroed(torch.empty_like(w_up), counts)
    # dx = dg · w_gate + du · w_up: the second term accumulates, so it runs after the first (its own job)
    _gemms([p for e, s, t in _slices(counts)
            for p in (((dg_NF[s:t], w_gate[e], dx_ND[s:t], False),) if dx_ND is not None else ())
            + ((dg_NF[s:t].t(), x_ND[s:t], dw_gate[e], False), (du_NF[s:t].t(), x_ND[s:t], dw_up[e], False))])
    if dx_ND is not None:
        _gemms([(du_NF[s:t], w_up[e], dx_ND[s:t], True) for e, s, t in _slices(counts)])
    if dx_ND is not None and sum(counts) < x_ND.shape[0]:
        dx_ND[sum(counts):] = 0
    workspace.give(du_NF, dg_NF)
    return dx_ND, dw_gate, dw_up, dw_down


class SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, counts: list[int], pooled: bool = True):
        ctx.dtypes = (x_ND.dtype, w_gate_EFD.dtype, w_up_EFD.dtype, w_down_EDF.dtype)
        x_ND, w_gate_EFD, w_up_EFD, w_down_EDF = cast_for_autocast(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF)
        keep = any(ctx.needs_input_grad)
        y_ND, saved = experts_forward(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, counts, keep=keep, pooled=pooled)
        ctx.pooled = pooled
        if keep and pooled:
            # pool buffers live on ctx (not save_for_backward) and go back to the pool when it dies
            ctx.acts = saved[1:]
            release_when_freed(ctx, *saved[1:])
            ctx.save_for_backward(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF)
        elif keep:  # saved tensors: activation checkpointing's hooks may drop and recompute them
            ctx.save_for_backward(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, *saved[1:])
        ctx.counts = counts
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w_gate, w_up, w_down, *acts = ctx.saved_tensors
        acts = ctx.acts if ctx.pooled else acts
        grads = experts_backward((x_ND, *acts), w_gate, w_up, w_down, ctx.counts, dy_ND.to(x_ND.dtype),
                                 need_dx=ctx.needs_input_grad[0])
        return (*(g if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None, None)


class Experts(nn.Module):
    def __init__(self, num_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.pool_activations = True  # False under activation checkpointing (see MoE.pool_activations)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))

    @torch.no_grad()
    def narrow_projections(self, dtype: torch.dtype) -> None:
        """For inference where the platform's ``linear`` reads ``dtype`` weights as stored (the serving path,
        ``moe.infer``, passes fp32 activations): the stacked weights in ``dtype``. Not for training."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(getattr(self, name).to(dtype), requires_grad=False))

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply expert e to its slice of ``x_ND``; rows grouped by expert in ascending order.

        ``counts`` is a host list (rows per expert): the caller's one host sync per layer.
        """
        if len(counts) != self.num_experts or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts {counts} do not describe {x_ND.shape[0]} rows over {self.num_experts} experts")
        return SwiGLUExperts.apply(x_ND, self.gate_proj, self.up_proj, self.down_proj, counts, self.pool_activations)
