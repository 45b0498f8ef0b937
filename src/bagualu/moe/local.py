"""The single-process MoE data path as one autograd Function: gather → experts → weight → scatter-add.

Legend: T tokens, D model dim, N kept routes (expert-major), e experts.

Why one Function: autograd over ``index_select`` → experts → ``mul`` → ``index_add`` allocates five fresh
[N, D] tensors per step (N = T·K: 50 MB each at T=4096, K=6, D=512 fp32), which glibc page-faults on
every call. Here every [N, D] intermediate comes from the workspace pool and only the [T, D] output
and input gradient are new. The math is ``dispatch.permute`` / ``experts`` / ``dispatch.unpermute_combine``:
the routing weight multiplies in fp32 (as transformers does), the per-token sum runs in the model dtype (both
in the platform's ``index_add_rows``).
"""

from __future__ import annotations

import torch

from bagualu.memory import workspace
from bagualu.ops import kernel
from bagualu.moe.experts import cast_for_autocast, experts_backward, experts_forward, release_when_freed


class LocalExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_N, w_gate, w_up, w_down, token_N, counts: list[int], pooled: bool = True):
        ctx.dtypes = (x_TD.dtype, w_N.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        x_TD, w_gate, w_up, w_down = cast_for_autocast(x_TD, w_gate, w_up, w_down)
        N, (T, D) = token_N.shape[0], x_TD.shape
        keep = any(ctx.needs_input_grad)
        out = workspace.take((N, D), x_TD.dtype, x_TD.device) if pooled else None
        x_ND = torch.index_select(x_TD, 0, token_N, out=out)
        y_ND, saved = experts_forward(x_ND, w_gate, w_up, w_down, counts, keep=keep, pooled=pooled)
        out_TD = torch.zeros(T, D, dtype=x_TD.dtype, device=x_TD.device)
        kernel("index_add_rows")(out_TD, token_N, y_ND, w_N)
        ctx.pooled = pooled
        if keep and pooled:
            ctx.acts = (x_ND, y_ND, *saved[1:])
            release_when_freed(ctx, x_ND, *saved[1:])  # y_ND is an ordinary tensor (experts_forward's output)
            ctx.save_for_backward(w_N, w_gate, w_up, w_down, token_N)
        elif keep:  # saved tensors: activation checkpointing's hooks may drop and recompute them
            ctx.save_for_backward(w_N, w_gate, w_up, w_down, token_N, x_ND, y_ND, *saved[1:])
        elif pooled:
            workspace.give(x_ND)
        if keep:
            ctx.counts, ctx.T = counts, T
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        w_N, w_gate, w_up, w_down, token_N, *acts = ctx.saved_tensors
        x_ND, y_ND, *pre = ctx.acts if ctx.pooled else acts
        (N, D), dt, dev = x_ND.shape, x_ND.dtype, x_ND.device
        dy_ND = torch.index_select(dout_TD.to(dt).contiguous(), 0, token_N, out=workspace.take((N, D), dt, dev))
        dw_N = None
        if ctx.needs_input_grad[1]:
            dw_N = kernel("row_dot")(dy_ND, y_ND).to(w_N.dtype)
        kernel("scale_rows")(dy_ND, w_N, out=dy_ND)
        dx_out = workspace.take((N, D), dt, dev)
        dx_ND, dw_gate, dw_up, dw_down = experts_backward((x_ND, *pre), w_gate, w_up, w_down, ctx.counts,
                                                          dy_ND, need_dx=True, dx_out=dx_out)
        dx_TD = kernel("index_add_rows")(torch.zeros(ctx.T, D, dtype=dt, device=dev), token_N, dx_ND)
        workspace.give(dy_ND, dx_out)
        grads = (dx_TD, dw_N, dw_gate, dw_up, dw_down)
        return (*(g if g is None else g.to(t) for g, t in zip(grads, ctx.dtypes)), None, None, None)
