"""Multi-head latent attention (MLA, DeepSeek-V2/V3), numerically as ``transformers``' deepseek_v2/v3.

Legend: B batch, S sequence, D model dim, H heads, C kv_lora_rank (the latent), Cq q_lora_rank,
Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dq = Dn + Dr, Dv v_head_dim.

    x_BSD --q_proj | q_a_proj > q_a_layernorm > q_b_proj--> q [B,H,S,Dq] = [q_nope Dn | q_rope Dr]
    x_BSD --kv_a_proj_with_mqa--> [latent C | k_rope Dr (one head, shared)]
                latent --kv_a_layernorm > kv_b_proj--> [k_nope Dn | v Dv] per head
    k = [k_nope | rope(k_rope) broadcast to H heads];  o = attention(q, k, v) [B,H,S,Dv] --o_proj--> D

Only the rope slices rotate; the latent is what an inference KV cache would hold. This module expands
it to full keys and values every call (training/prefill form) rather than absorbing ``kv_b_proj`` into
the query and output projections (the decode-time trick), which would change the rounding.
Parameter names are Hugging Face's, so checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.models.config import ModelConfig
from bagualu.models.norm import RMSNorm
from bagualu.models.rope import yarn_mscale
from bagualu.ops import kernel
from bagualu.ops.dense import Linear

# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """``Dq**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` under a scaled RoPE that sets mscale_all_dim.

    YaRN lengthens the context by sharpening attention; DeepSeek applies that correction to the softmax
    scale (rather than to cos/sin, where ``attention_factor`` goes). Same expression order as transformers.
    """
    scale = cfg.mla.qk_head_dim ** (-0.5)
    r = cfg.rope
    if r.type != "default" and r.mscale_all_dim:
        m = yarn_mscale(r.factor, r.mscale_all_dim)
        scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    """``o_BSD = mla(x_BSD, (cos, sin), mask_BSS)``; biases: ``qkv_bias`` on the two down-projections
    (``q_a_proj``, ``kv_a_proj_with_mqa``), ``o_bias`` on ``o_proj``, as transformers' ``attention_bias``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mla
        D, H = cfg.hidden_size, cfg.num_heads
        self.H, self.C = H, m.kv_lora_rank
        self.Dn, self.Dr, self.Dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        Dq = m.qk_head_dim
        self.scale = mla_softmax_scale(cfg)
        self.rope_op = "apply_rope_complex" if m.rope_complex else (
            "apply_rope_interleaved" if m.rope_interleave else "apply_rope")
        self.q_lora = m.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = Linear(D, H * Dq, bias=False)
        else:
            self.q_a_proj = Linear(D, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(m.q_lora_rank, H * Dq, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.C + self.Dr, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.C, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.C, H * (self.Dn + self.Dv), bias=False)
        self.o_proj = Linear(H * self.Dv, D, bias=cfg.o_bias)

    def _queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if not self.q_lora:
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))

    def forward(self, x_BSD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                mask_BSS: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, C, Dn, Dr, Dv = self.H, self.C, self.Dn, self.Dr, self.Dv
        q_BHSDq = self._queries(x_BSD).view(B, S, H, Dn + Dr).transpose(1, 2)
        q_nope_BHSDn, q_rope_BHSDr = torch.split(q_BHSDq, [Dn, Dr], dim=-1)
        latent_BSC, k_rope_BSDr = torch.split(self.kv_a_proj_with_mqa(x_BSD), [C, Dr], dim=-1)
        latent_BSC = self.kv_a_layernorm(latent_BSC)
        q_rope_BHSDr, k_rope_B1SDr = kernel(self.rope_op)(q_rope_BHSDr, k_rope_BSDr.view(B, 1, S, Dr), *cos_sin)
        kv_BHS = self.kv_b_proj(latent_BSC).view(B, S, H, Dn + Dv).transpose(1, 2)
        k_nope_BHSDn, v_BHSDv = torch.split(kv_BHS, [Dn, Dv], dim=-1)
        q_BHSDq = torch.cat((q_nope_BHSDn, q_rope_BHSDr), dim=-1)
        k_BHSDq = torch.cat((k_nope_BHSDn, k_rope_B1SDr.expand(B, H, S, Dr)), dim=-1)
        o_BHSDv = kernel("attention")(q_BHSDq, k_BHSDq, v_BHSDv, mask_BSS, self.scale)
        return self.o_proj(o_BHSDv.transpose(1, 2).reshape(B, S, H * Dv))
