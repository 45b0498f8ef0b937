"""FasterMoE's shadow experts: a hot expert's weights go to every rank instead of its tokens to the owner.

Legend: n shadowed experts, e local experts per rank, F expert FFN dim, D model dim.

Forward broadcasts each shadowed expert's three matrices (packed in one buffer) from its owner; every
rank then computes its own routes to that expert locally. Backward reduces (sums) the shadow copies'
gradients onto the owner, whose gradient for that expert slice then holds exactly what it would have
accumulated had the tokens travelled — so the MoDa gradient sync and the update are unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ShadowWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w_gate_eFD, w_up_eFD, w_down_eDF, shadow: tuple[int, ...], ep_rank: int, group):
        e, F_, D = w_gate_eFD.shape
        FD = F_ * D
        buf_n3 = w_gate_eFD.new_empty(len(shadow), 3 * FD)
        for i, x in enumerate(shadow):
            owner, j = divmod(x, e)
            if owner == ep_rank:
                buf_n3[i, :FD] = w_gate_eFD[j].reshape(-1)
                buf_n3[i, FD:2 * FD] = w_up_eFD[j].reshape(-1)
                buf_n3[i, 2 * FD:] = w_down_eDF[j].reshape(-1)
            dist.broadcast(buf_n3[i], src=dist.get_global_rank(group, owner), group=group)
        ctx.meta = (shadow, ep_rank, group, e, F_, D)
        return (buf_n3[:, :FD].reshape(-1, F_, D).clone(), buf_n3[:, FD:2 * FD].reshape(-1, F_, D).clone(),
                buf_n3[:, 2 * FD:].reshape(-1, D, F_).clone())

    @staticmethod
    def backward(ctx, g_gate, g_up, g_down):
        shadow, ep_rank, group, e, F_, D = ctx.meta
        grads = [g_gate.new_zeros(e, F_, D), g_up.new_zeros(e, F_, D), g_down.new_zeros(e, D, F_)]
        for i, x in enumerate(shadow):
            owner, j = divmod(x, e)
            flat = torch.cat([g[i].reshape(-1) for g in (g_gate, g_up, g_down)])
            dist.reduce(flat, dst=dist.get_global_rank(group, owner), group=group)
            if owner == ep_rank:
                grads[0][j] = flat[:F_ * D].view(F_, D)
                grads[1][j] = flat[F_ * D:2 * F_ * D].view(F_, D)
                grads[2][j] = flat[2 * F_ * D:].view(D, F_)
        return (*grads, None, None, None)


def shadow_weights(experts, shadow: tuple[int, ...], ep_rank: int, group):
    """``(w_gate [n,F,D], w_up [n,F,D], w_down [n,D,F])`` of the shadowed experts, on every rank."""
    return ShadowWeights.apply(experts.gate_proj, experts.up_proj, experts.down_proj, shadow, ep_rank, group)
