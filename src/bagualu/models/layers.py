"""Decoder building blocks: grouped-query attention with RoPE, the decoder layer (GQA or MLA attention).

Legend: B batch, S sequence, D model dim, H heads, G KV heads, Dh head dim.
Parameter names match Hugging Face so checkpoints map by renaming only a few MoE keys.
Kernels come from ``bagualu.ops.kernel`` so a platform can replace any of them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.models.config import ModelConfig
from bagualu.models.mla import MLAttention
from bagualu.models.norm import RMSNorm
from bagualu.moe import MLP, MoE
from bagualu.moe.mlp import view_parts
from bagualu.ops import kernel
from bagualu.ops.dense import Linear, linear

__all__ = ["RMSNorm", "Attention", "DecoderLayer"]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, G, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
        self.H, self.G, self.Dh = H, G, Dh
        self.scale = Dh**-0.5
        self.q_proj = Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, G * Dh, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, G * Dh, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * Dh, D, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3-style: RMSNorm over each head's features, before RoPE
            self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """For inference: one ``[(H + 2G)·Dh, D]`` weight so q, k and v are one GEMM (fewer, larger
        GEMMs run closer to peak at decode batch sizes). ``q_proj``/``k_proj``/``v_proj`` then hold views
        of it — no second copy, and their names still save and load as before. Not for training: the
        fused tensor is not a parameter."""
        if self.qkv_weight is not None:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        b = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
        if b is not None:
            i = 0
            for p in projs:
                n = p.weight.shape[0]
                p.bias = nn.Parameter(b[i:i + n], requires_grad=False)
                i += n
        self.qkv_weight, self.qkv_bias = view_parts(torch.cat([p.weight for p in projs]), projs), b

    @torch.no_grad()
    def narrow_projections(self, dtype: torch.dtype) -> None:
        """For inference where the platform's ``linear`` reads ``dtype`` weights as stored (activations and
        biases stay as they are): the fused q/k/v weight (q/k/v_proj views of it) and ``o_proj``'s in
        ``dtype``."""
        self.fuse_projections()
        self.qkv_weight = view_parts(self.qkv_weight.to(dtype), (self.q_proj, self.k_proj, self.v_proj))
        self.o_proj.weight = nn.Parameter(self.o_proj.weight.to(dtype), requires_grad=False)

    def qkv_tokens(self, x_TD: torch.Tensor, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor):
        """Projections of a flat run of tokens, normed and rotated: ``q [T, H, Dh]``, ``k``/``v [T, G, Dh]``.

        The serving engine calls this directly (its tokens are a varlen batch over a paged KV cache);
        ``forward`` calls it on the flattened batch, so both paths share every operation.
        """
        T = x_TD.shape[0]
        if self.qkv_weight is not None:  # one GEMM for the three projections (see fuse_projections)
            qkv = kernel("linear")(x_TD, self.qkv_weight, self.qkv_bias)
            q, k, v = qkv.split([self.H * self.Dh, self.G * self.Dh, self.G * self.Dh], dim=-1)
            q, k, v = q.view(T, self.H, self.Dh), k.view(T, self.G, self.Dh), v.view(T, self.G, self.Dh)
        elif torch.is_grad_enabled() and self.q_proj.weight.requires_grad:
            # training: one GEMM against the three weights concatenated (a copy of (H + 2G)·Dh·D elements
            # per call, ~0.1% of the GEMM at T = 2048): forward, input gradient and weight gradient are one
            # GEMM each instead of three (the G-wide ones run well below peak); autograd splits the weight
            # gradient back into the three parameters' own tensors
            projs = (self.q_proj, self.k_proj, self.v_proj)
            w = torch.cat([p.weight for p in projs])
            b = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
            q, k, v = linear(x_TD, w, b).split([self.H * self.Dh, self.G * self.Dh, self.G * self.Dh], dim=-1)
            q, k, v = q.view(T, self.H, self.Dh), k.view(T, self.G, self.Dh), v.view(T, self.G, self.Dh)
        else:
            q = self.q_proj(x_TD).view(T, self.H, self.Dh)
            k = self.k_proj(x_TD).view(T, self.G, self.Dh)
            v = self.v_proj(x_TD).view(T, self.G, self.Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # as [B=T, heads, S=1, Dh] with cos/sin [T, 1, Dr], the rope kernel rotates each token in place
        q, k = kernel("apply_rope")(q.unsqueeze(2), k.unsqueeze(2), cos_TDr.unsqueeze(1), sin_TDr.unsqueeze(1))
        return q.squeeze(2), k.squeeze(2), v

    def forward(self, x_BSD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                mask_BSS: torch.Tensor | None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        cos, sin = cos_sin
        q, k, v = self.qkv_tokens(x_BSD.reshape(B * S, D), cos.reshape(B * S, -1), sin.reshape(B * S, -1))
        q_BHSDh = q.view(B, S, self.H, self.Dh).transpose(1, 2)
        k_BGSDh = k.view(B, S, self.G, self.Dh).transpose(1, 2)
        v_BGSDh = v.view(B, S, self.G, self.Dh).transpose(1, 2)
        o_BHSDh = kernel("attention")(q_BHSDh, k_BGSDh, v_BGSDh, mask_BSS, self.scale)
        return self.o_proj(o_BHSDh.transpose(1, 2).reshape(B, S, self.H * self.Dh))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.window = cfg.window(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg) if cfg.mla is not None else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(index):
            m = cfg.moe
            self.mlp = MoE(
                cfg.hidden_size, m.ffn_dim, m.num_experts, m.top_k, router=m.router,
                norm_topk_prob=m.norm_topk_prob, num_groups=m.num_groups, topk_groups=m.topk_groups,
                routed_scaling_factor=m.routed_scaling_factor, num_shared_experts=m.num_shared_experts,
                shared_ffn_dim=m.shared_ffn_dim, shared_expert_gate=m.shared_expert_gate,
            )
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    def forward(self, x_BSD, cos_sin, mask_BSS):
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_sin, mask_BSS)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))
