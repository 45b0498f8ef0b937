"""The local MoE data path for inference (no autograd): each expert's rows through the platform's ``linear``.

Legend: T tokens, D model dim, F expert FFN dim, N kept routes (expert-major), e local experts.

Why a second path beside ``LocalExperts`` (which training uses): at decode batch sizes an expert sees one
to a few rows, where ``torch.mm`` on the transposed stacked weight runs far below the memory bound on CPU
(and the autograd Function and its workspace pool cost more than such GEMMs). Here each active expert
reads its Hugging Face-layout weights (``gate[e]``/``up[e]`` ``[F, D]``, ``down[e]`` ``[D, F]``) once
through ``kernel("linear")``: the small-M kernel on CPU, ``F.linear`` where a platform has none. Idle
experts' weights are not touched. The math is ``LocalExperts``'s: silu(g)·u, the routing weight
multiplies in fp32, the per-token sum runs in the model dtype; only GEMM summation order differs.
"""

from __future__ import annotations

import torch

from bagualu.ops import kernel


def local_experts_inference(x_TD: torch.Tensor, w_N: torch.Tensor, w_gate_EFD: torch.Tensor,
                            w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, token_N: torch.Tensor,
                            counts: list[int]) -> torch.Tensor:
    """``y_TD = Σ_routes w · expert(x)``; ``token_N``/``w_N`` list the kept routes grouped by expert
    (``counts[e]`` each, ascending e). Call it under ``torch.inference_mode()`` or ``no_grad``."""
    one = x_TD.shape[0] == 1  # batch-1 decode: every route is token 0's
    out_TD = torch.zeros_like(x_TD)
    s = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        tok = None if one else token_N[s:s + n]
        x = x_TD if one else x_TD.index_select(0, tok)
        yw = _weighted_expert(x, w_gate_EFD[e], w_up_EFD[e], w_down_EDF[e], w_N[s:s + n, None], x_TD.dtype)
        # out[tok] += yw in expert order, as index_add_ (and transformers) sums; not index_add_ itself: it
        # runs as scatter_add_, an OpenMP region even for one row (a scheduler time slice when the other
        # core is busy). A token appears at most once per expert, so gather-add-put is exact.
        if one:
            out_TD.add_(yw)
        else:
            out_TD.index_put_((tok,), out_TD.index_select(0, tok).add_(yw))
        s += n
    return out_TD


def one_token_experts(x_1D: torch.Tensor, w_1K: torch.Tensor, experts: list[int], ex) -> torch.Tensor:
    """``local_experts_inference`` for one token (batch-1 decode) whose routes are ``experts`` (the router's
    K choices, in its order; ``w_1K`` their weights): the same arithmetic in the same order — experts in
    ascending id, the weight applied in fp32 — without building a dispatch."""
    out = torch.zeros_like(x_1D)
    for j in sorted(range(len(experts)), key=experts.__getitem__):
        e = experts[j]
        out.add_(_weighted_expert(x_1D, ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e], w_1K[:, j:j + 1],
                                  x_1D.dtype))
    return out


def _weighted_expert(x, w_gate, w_up, w_down, w_col, dtype):
    """One expert's SwiGLU on rows ``x``, times the routing weights ``w_col`` ([rows, 1], fp32), in ``dtype``."""
    lin = kernel("linear")
    h = kernel("silu_mul")(lin(x, w_gate), lin(x, w_up))
    return (lin(h.to(dtype), w_down).to(dtype) * w_col).to(dtype)
