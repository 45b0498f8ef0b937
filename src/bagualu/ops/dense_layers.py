"""``dense_layers``: a stack of dense pre-norm decoder layers over a paged KV cache, as one operator.

This is the serving engine's step for Llama-family models whose layers are all dense (GQA attention with
rotate-half RoPE, SwiGLU MLP). Per layer, with ``x [T, D]``::

    h = rms_norm(x, input_norm);  q, k, v = split(linear(h, qkv_w, qkv_b));  q, k = apply_rope(q, k, cos, sin)
    write_kv(k_cache, v_cache, k, v, slots);  o = paged_attention(q, k_cache, v_cache, ...)
    x = x + linear(o, o_w, o_b);  g, u = chunk(linear(rms_norm(x, post_norm), gate_up_w, gate_up_b))
    x = x + linear(silu_mul(g, u), down_w, down_b)

The reference below composes the platform's own kernels (``kernel(op)`` for each step), so on any platform
it computes what the engine's per-layer path computes; a platform may replace the whole stack with one
native call (the CPU's: ``ops/dense_layers_cpu.py``), which removes the interpreter from the layer loop.

Legend: T tokens, D model dim, H heads, G KV heads, Dh head dim, Dr rotated features, F MLP width,
S sequences, M block-table columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """One layer's weights (``[out, in]`` as ``nn.Linear``; ``qkv_w`` is ``[(H + 2G) Dh, D]``, ``gate_up_w``
    ``[2F, D]``, gate rows first) and its sliding window (None: full attention)."""

    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    window: int | None = None


@dataclass(frozen=True, eq=False)
class DenseStack:
    """The layers and the shapes they share. ``native`` is where a platform's kernel keeps what it builds
    once per stack (pointer tables); nothing else may rely on it."""

    layers: tuple[DenseLayer, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    native: dict = field(default_factory=dict, repr=False)


def dense_layers(x_TD: torch.Tensor, stack: DenseStack, caches, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor,
                 block_tables_SM: torch.Tensor, context_lens_S: torch.Tensor, query_start_loc_S1: torch.Tensor,
                 slot_mapping_T: torch.Tensor) -> torch.Tensor:
    """Run every layer of ``stack`` on ``x [T, D]``; ``caches[l]`` is layer l's ``(k_cache, v_cache)``.
    Writes this step's keys and values into the caches and returns the new ``x``."""
    from bagualu.ops.registry import kernel  # the registry imports this module for its reference table

    lin, rms, rope, silu_mul = kernel("linear"), kernel("rms_norm"), kernel("apply_rope"), kernel("silu_mul")
    write_kv, attend = kernel("write_kv"), kernel("paged_attention")
    H, G, Dh = stack.num_heads, stack.num_kv_heads, stack.head_dim
    T = x_TD.shape[0]
    cos, sin = cos_TDr.unsqueeze(1), sin_TDr.unsqueeze(1)
    x = x_TD
    for layer, (k_cache, v_cache) in zip(stack.layers, caches, strict=True):
        qkv = lin(rms(x, layer.input_norm, stack.eps), layer.qkv_w, layer.qkv_b)
        q, k, v = qkv.split([H * Dh, G * Dh, G * Dh], dim=-1)
        q, k = rope(q.view(T, H, 1, Dh), k.view(T, G, 1, Dh), cos, sin)
        q, k, v = q.squeeze(2), k.squeeze(2), v.view(T, G, Dh)
        write_kv(k_cache, v_cache, k, v, slot_mapping_T)
        o = attend(q, k_cache, v_cache, block_tables_SM, context_lens_S, query_start_loc_S1, stack.scale, layer.window)
        x = x + lin(o.reshape(T, H * Dh), layer.o_w, layer.o_b)
        gate, up = lin(rms(x, layer.post_norm, stack.eps), layer.gate_up_w, layer.gate_up_b).chunk(2, dim=-1)
        x = x + lin(silu_mul(gate, up), layer.down_w, layer.down_b)
    return x
