"""Reference operators: the specification every fast kernel is tested against.

Numerics follow Hugging Face ``transformers`` exactly (same casts, same order of operations), because
the models' parity tests compare against it at 1e-5 relative in fp32.

Legend: B batch, S sequence, T tokens, D model dim, F FFN dim, H heads, G KV heads, Dh head dim,
Dr rotated features per head (MLA's rope slice), Dv value width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back before the weight multiply (Llama/HF order)."""
    dtype = x.dtype
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(dtype)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           half_operands: bool = False) -> torch.Tensor:
    """``x @ w.T + bias``; a weight stored narrower than ``x`` (bf16 weights, fp32 activations) is widened.
    ``half_operands``: ``x`` is first rounded to such a weight's dtype (autocast's rule for a half GEMM: both
    operands half, fp32 accumulation), so a platform may multiply half operands natively."""
    if w.dtype != x.dtype:
        if half_operands:
            x = x.to(w.dtype).to(x.dtype)
        w = w.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, bias)


@functools.lru_cache(maxsize=None)
def gemm_via_fp32(dtype: torch.dtype, device_type: str) -> bool:
    """True where the platform's GEMM in ``dtype`` is slower than in fp32 — bf16 on CPUs without bf16 units
    (measured here on an AVX2 EPYC: 1.4 vs 137 GFLOP/s). There GEMMs in ``dtype`` run on the fp32 units:
    bf16 operands are exact in fp32, a bf16 GEMM accumulates in fp32 anyway, and the result is rounded
    back to bf16 — the same numbers up to summation order, at fp32 speed. Decided from the platform's
    measured (cached) peak figures, once per process."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    from bagualu.platform import current_platform

    plat = current_platform()
    return plat.device_type == device_type and plat.peak_flops(dtype) < plat.peak_flops(torch.float32)


def grouped_mm(problems) -> None:
    """``out (+)= a @ b`` for every ``(a, b, out, accumulate)`` of ``problems`` (2-D tensors; ``out`` written in
    place, in its own dtype): one ``torch.mm``/``addmm_`` each, through fp32 where the operands' dtypes differ
    from ``out``'s or ``gemm_via_fp32`` says the platform's half-precision GEMM is slower. A platform kernel may
    run the problems concurrently: one call's outputs must not overlap each other or any operand (a second
    term into the same output is a second call)."""
    for a, b, out, accumulate in problems:
        if a.dtype != out.dtype or b.dtype != out.dtype or gemm_via_fp32(out.dtype, out.device.type):
            with torch.autocast(out.device.type, enabled=False):  # else autocast would cast the fp32 operands back
                r = torch.addmm(out.float(), a.float(), b.float()) if accumulate else torch.mm(a.float(), b.float())
            out.copy_(r)
        elif accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's first maximum (a NaN counts as the maximum), int64 ``x.shape[:-1]``."""
    return x.argmax(-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up (into ``out`` when given; it may be ``gate`` or ``up`` itself)."""
    if out is None:
        return F.silu(gate) * up
    if out is up:
        return out.mul_(F.silu(gate))
    return torch._C._nn.silu(gate, out=out).mul_(up)


def silu_mul_backward(da: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, du_out: torch.Tensor | None = None,
                      dg_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(du, dg)`` of ``a = silu(gate) * up`` given ``da``: ``du = da · silu(gate)``, ``dg = da · up · silu'(gate)``
    (``silu_backward``, PyTorch's one-pass derivative, as autograd over ``F.silu`` runs it). Into ``du_out`` and
    ``dg_out`` when given (distinct; either may be one of the inputs)."""
    silu = F.silu(gate)
    dg = torch.ops.aten.silu_backward(da * up, gate)
    du = torch.mul(da, silu, out=du_out) if du_out is not None else da * silu
    if dg_out is not None:
        dg = dg_out.copy_(dg)
    return du, dg


def scale_rows(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[n, :] * w[n]`` for 2-D ``x`` and fp32 ``w``: the product in fp32 (as transformers weights expert
    outputs by their routing weights), rounded to ``x``'s dtype; into ``out`` when given (it may be ``x``)."""
    if out is None:
        return (x * w.unsqueeze(-1)).to(x.dtype)
    return torch.mul(x, w.unsqueeze(-1), out=out)


def index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor,
                   w: torch.Tensor | None = None) -> torch.Tensor:
    """``out[index[n]] += src[n]`` for every row ``n`` in order (``index_add_`` along dim 0: each addition
    rounded to ``out``'s dtype), ``src[n]`` first scaled by ``w[n]`` as ``scale_rows`` does when ``w`` is given;
    in place, returns ``out``."""
    return out.index_add_(0, index, src if w is None else scale_rows(src, w))


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a[n, d] * b[n, d]`` per row of 2-D ``a`` and ``b``, accumulated and returned in fp32 (fp64 for fp64
    inputs)."""
    return torch.mul(a, b).sum(-1, dtype=torch.promote_types(a.dtype, torch.float32))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q_BHSDh: torch.Tensor, k_BGSDh: torch.Tensor, cos_BSDh: torch.Tensor, sin_BSDh: torch.Tensor):
    """Rotary embedding in the "rotate half" (NeoX) layout; cos/sin broadcast over heads.

    Only the first ``cos.shape[-1]`` features rotate (partial rotary); the rest pass through.
    """
    cos = cos_BSDh.unsqueeze(1)
    sin = sin_BSDh.unsqueeze(1)
    r = cos.shape[-1]
    if r == q_BHSDh.shape[-1]:
        return q_BHSDh * cos + _rotate_half(q_BHSDh) * sin, k_BGSDh * cos + _rotate_half(k_BGSDh) * sin
    qr, qp = q_BHSDh[..., :r], q_BHSDh[..., r:]
    kr, kp = k_BGSDh[..., :r], k_BGSDh[..., r:]
    q = torch.cat((qr * cos + _rotate_half(qr) * sin, qp), dim=-1)
    k = torch.cat((kr * cos + _rotate_half(kr) * sin, kp), dim=-1)
    return q, k


def apply_rope_interleaved(q_BHSDr: torch.Tensor, k_BGSDr: torch.Tensor, cos_BSDr: torch.Tensor,
                           sin_BSDr: torch.Tensor):
    """Rotary embedding on adjacent pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's layout), in the input dtype.

    The output is de-interleaved (rotated evens, then rotated odds), as ``transformers``' deepseek_v3:
    q and k are permuted alike, so q.k is unchanged and no re-interleaving copy is paid.
    ``cos``/``sin`` are the usual ``cat(freqs, freqs)`` tables; their first half is the per-pair angle.
    """
    half = cos_BSDr.shape[-1] // 2
    cos = cos_BSDr[..., :half].unsqueeze(1)
    sin = sin_BSDr[..., :half].unsqueeze(1)

    def rot(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rot(q_BHSDr), rot(k_BGSDr)


def apply_rope_complex(q_BHSDr: torch.Tensor, k_BGSDr: torch.Tensor, cos_BSDr: torch.Tensor,
                       sin_BSDr: torch.Tensor):
    """DeepSeek-V2's rotation: adjacent pairs as complex numbers times ``cos + i sin``, in fp32.

    The result stays interleaved and is cast back to the input dtype; pass fp32 ``cos``/``sin`` to
    match ``transformers`` in bf16 (its ``freqs_cis`` are never cast to the model dtype).
    """
    half = cos_BSDr.shape[-1] // 2
    f = torch.complex(cos_BSDr[..., :half].float(), sin_BSDr[..., :half].float()).unsqueeze(1)

    def rot(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * f).flatten(-2).type_as(x)

    return rot(q_BHSDr), rot(k_BGSDr)


def attention(
    q_BHSDh: torch.Tensor,
    k_BGSDh: torch.Tensor,
    v_BGSDh: torch.Tensor,
    mask_BSS: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Softmax attention with grouped KV heads; ``mask`` is boolean (True = attend) or None for causal.

    Returns ``[B, H, S, Dv]``; values may be narrower than queries and keys (MLA; SDPA allows it). As
    ``transformers``' SDPA path decides: without a mask and with equal head dims up to 256, SDPA groups
    the KV heads itself (``enable_gqa``: no [B, H, S, Dh] copies of k and v, and no sum over the copies
    in the backward — 1.2x on the causal training attention here); otherwise KV heads are repeated (as
    HF's ``repeat_kv``), so the kernel sees the shapes the reference implementation does.
    """
    H, G = q_BHSDh.shape[1], k_BGSDh.shape[1]
    if mask_BSS is None and H != G and k_BGSDh.shape[-1] == v_BGSDh.shape[-1] <= 256:
        return F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, scale=scale, enable_gqa=True)
    if H != G:
        k_BGSDh = k_BGSDh.repeat_interleave(H // G, dim=1)
        v_BGSDh = v_BGSDh.repeat_interleave(H // G, dim=1)
    if mask_BSS is None:
        return F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, attn_mask=mask_BSS.unsqueeze(1), scale=scale)


def moe_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, w_gate_EFD: torch.Tensor,
                w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, capacity: int | None = None):
    """Brute-force routed SwiGLU experts: token by token, choice by choice (the MoE layer's oracle).

    A route with expert id -1 is dropped by the router; with ``capacity`` an expert takes its first
    ``capacity`` routes in (token, choice) order and drops the rest. Returns ``(y_TD, dropped)``.
    """
    y_TD = torch.zeros_like(x_TD)
    taken: dict[int, int] = {}
    dropped = 0
    for t in range(x_TD.shape[0]):
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            if e < 0:
                continue
            if capacity is not None and taken.get(e, 0) >= capacity:
                dropped += 1
                continue
            taken[e] = taken.get(e, 0) + 1
            x = x_TD[t]
            h = F.silu(w_gate_EFD[e] @ x) * (w_up_EFD[e] @ x)
            y_TD[t] += (weights_TK[t, k] * (w_down_EDF[e] @ h)).to(x_TD.dtype)
    return y_TD, dropped
