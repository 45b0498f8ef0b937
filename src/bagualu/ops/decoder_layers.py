"""``decoder_layers``: a stack of pre-norm decoder layers over a paged KV cache, as one operator.

This is the serving engine's step for GQA models with rotate-half RoPE whose feed-forward blocks are
SwiGLU MLPs (Llama) or MoE blocks with a plain top-k router (Mixtral, Qwen2-MoE). Per layer, ``x [T, D]``::

    h = rms_norm(x, input_norm);  q, k, v = split(linear(h, qkv_w, qkv_b));  q, k = apply_rope(q, k, cos, sin)
    write_kv(k_cache, v_cache, k, v, slots);  o = paged_attention(q, k_cache, v_cache, ...)
    x = x + linear(o, o_w, o_b);  h = rms_norm(x, post_norm)
    MLP:  g, u = chunk(linear(h, gate_up_w, gate_up_b));  x = x + linear(silu_mul(g, u), down_w, down_b)
    MoE:  x = x + moe(h)   (``moe_block`` below: route, then each expert on its rows, plus shared experts)

The reference below composes the platform's own kernels (``kernel(op)`` for each step), so on any platform
it computes what the engine's per-layer path computes; a platform may replace the whole stack with one
native call (the CPU's: ``ops/decoder_layers_cpu.py``), which removes the interpreter from the layer loop.
``decoder_layer_halves`` is the same stack with the attention left out, for attention computed elsewhere
(the serving engine's R-workers): a layer's half after attention, then the next layer's half before it.

Legend: T tokens, D model dim, H heads, G KV heads, Dh head dim, Dr rotated features, F MLP width,
S sequences, M block-table columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


ROUTERS = ("softmax_topk", "topk_softmax")


@dataclass(frozen=True, eq=False)
class MoEBlock:
    """An MoE block's weights: ``router_w [E, D]``; stacked experts ``gate_w``/``up_w [E, F, D]``, ``down_w
    [E, D, F]``; optional shared SwiGLU MLP (``shared_gate_up_w [2Fs, D]``, ``shared_down_w [D, Fs]``)
    scaled by ``sigmoid(h @ shared_gate_w^T)`` when ``shared_gate_w [1, D]`` is given. ``router``:
    ``softmax_topk`` (top-k of the softmax, renormalised if ``norm_topk_prob``) or ``topk_softmax``
    (softmax of the top-k logits)."""

    router_w: torch.Tensor
    gate_w: torch.Tensor
    up_w: torch.Tensor
    down_w: torch.Tensor
    top_k: int
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    shared_gate_up_w: torch.Tensor | None = None
    shared_down_w: torch.Tensor | None = None
    shared_gate_w: torch.Tensor | None = None

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r} is not one of {ROUTERS}")


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One layer's weights (``[out, in]`` as ``nn.Linear``; ``qkv_w`` is ``[(H + 2G) Dh, D]``, ``gate_up_w``
    ``[2F, D]``, gate rows first) and its sliding window (None: full attention). An MoE layer gives ``moe``
    and None for the MLP's four tensors."""

    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor | None
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor | None
    down_b: torch.Tensor | None
    window: int | None = None
    moe: MoEBlock | None = None


@dataclass(frozen=True, eq=False)
class LayerStack:
    """The layers and the shapes they share. ``native`` is where a platform's kernel keeps what it builds
    once per stack (pointer tables); nothing else may rely on it."""

    layers: tuple[LayerWeights, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    native: dict = field(default_factory=dict, repr=False)
    half_operands: bool = False
    """The projections' inputs are rounded to their half weights' dtype first (autocast's rule for a half
    GEMM: both operands half, fp32 accumulation): where the platform multiplies half operands natively
    (AVX512-BF16), twice the fp32 rate. Routers and gates keep their inputs; nothing else changes."""
    packed_min_rows: int = 0
    """Steps of at least this many tokens multiply by copies of the layers' projections (in an MoE layer, of
    every expert the step routes rows to) that the platform's kernel repacks for its tiles, where it has such tiles for these weights (on CPU: bf16 with
    ``half_operands`` on AVX512-BF16, ``ops.linear_cpu.pack_bf16``; fp32 on AVX-512, ``pack_f32``), made on the
    stack's first native step and kept with it (memory: one more copy of those weights). The products are the
    same; their sums run in another order. 0: never."""


class _Kernels:
    """The platform's kernels a layer's halves compose (the linear one with half operands where the stack asks)."""

    def __init__(self, stack: LayerStack):
        from bagualu.ops.registry import kernel  # the registry imports this module for its reference table

        self.lin, self.rms, self.rope = kernel("linear"), kernel("rms_norm"), kernel("apply_rope")
        self.silu_mul = kernel("silu_mul")
        if stack.half_operands:
            self.lin = functools.partial(self.lin, half_operands=True)


def _pre_attention(kn: _Kernels, stack: LayerStack, layer: LayerWeights, x: torch.Tensor, cos, sin):
    """q [T, H, Dh], k, v [T, G, Dh] of ``layer`` for ``x`` (``cos``/``sin`` ``[T, 1, Dr]``)."""
    H, G, Dh = stack.num_heads, stack.num_kv_heads, stack.head_dim
    T = x.shape[0]
    qkv = kn.lin(kn.rms(x, layer.input_norm, stack.eps), layer.qkv_w, layer.qkv_b)
    q, k, v = qkv.split([H * Dh, G * Dh, G * Dh], dim=-1)
    q, k = kn.rope(q.view(T, H, 1, Dh), k.view(T, G, 1, Dh), cos, sin)
    return q.squeeze(2), k.squeeze(2), v.view(T, G, Dh)


def _post_attention(kn: _Kernels, stack: LayerStack, layer: LayerWeights, x: torch.Tensor, o_THDh: torch.Tensor):
    """The new ``x`` after ``layer``'s output projection of the attention's ``o`` and its MLP or MoE block."""
    x = x + kn.lin(o_THDh.reshape(x.shape[0], -1), layer.o_w, layer.o_b)
    h = kn.rms(x, layer.post_norm, stack.eps)
    if layer.moe is not None:
        return x + moe_block(h, layer.moe, kn.lin)
    gate, up = kn.lin(h, layer.gate_up_w, layer.gate_up_b).chunk(2, dim=-1)
    return x + kn.lin(kn.silu_mul(gate, up), layer.down_w, layer.down_b)


def decoder_layers(x_TD: torch.Tensor, stack: LayerStack, caches, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor,
                 block_tables_SM: torch.Tensor, context_lens_S: torch.Tensor, query_start_loc_S1: torch.Tensor,
                 slot_mapping_T: torch.Tensor) -> torch.Tensor:
    """Run every layer of ``stack`` on ``x [T, D]``; ``caches[l]`` is layer l's ``(k_cache, v_cache)``.
    Writes this step's keys and values into the caches and returns the new ``x``."""
    from bagualu.ops.registry import kernel

    kn = _Kernels(stack)
    write_kv, attend = kernel("write_kv"), kernel("paged_attention")
    cos, sin = cos_TDr.unsqueeze(1), sin_TDr.unsqueeze(1)
    x = x_TD
    for layer, (k_cache, v_cache) in zip(stack.layers, caches, strict=True):
        q, k, v = _pre_attention(kn, stack, layer, x, cos, sin)
        write_kv(k_cache, v_cache, k, v, slot_mapping_T)
        o = attend(q, k_cache, v_cache, block_tables_SM, context_lens_S, query_start_loc_S1, stack.scale, layer.window)
        x = _post_attention(kn, stack, layer, x, o)
    return x


def decoder_layer_halves(x_TD: torch.Tensor, stack: LayerStack, post: int | None, o_THDh: torch.Tensor | None,
                         pre: int | None, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor):
    """The S-part of ``stack`` around attention computed elsewhere (FastDecode's R-workers), for one
    micro-batch: layer ``post``'s half after attention on its output ``o [T, H, Dh]``, then layer ``pre``'s half
    before attention (None: skip either). Returns ``(x, q, k, v)``: the new ``x [T, D]`` (which may be ``x_TD``
    itself, updated in place) and layer ``pre``'s ``q [T, H, Dh]``, ``k``, ``v [T, G, Dh]`` (None without
    ``pre``). ``decoder_layers`` is this with attention over a local cache in between."""
    kn = _Kernels(stack)
    x = x_TD if post is None else _post_attention(kn, stack, stack.layers[post], x_TD, o_THDh)
    if pre is None:
        return x, None, None, None
    return (x, *_pre_attention(kn, stack, stack.layers[pre], x, cos_TDr.unsqueeze(1), sin_TDr.unsqueeze(1)))


def moe_block(h_TD: torch.Tensor, m: MoEBlock, experts_linear=None) -> torch.Tensor:
    """The MoE block as ``bagualu.moe.MoE`` computes it for inference: routing weights in fp32, each expert
    (ascending id) on its rows (in token order) through ``linear``, ``y[t] += z * w`` in that order, then
    the shared experts. ``experts_linear``: the experts' (routed and shared) ``linear``, if not the
    platform's (``decoder_layers`` passes its half-operand one); routers and gates use the platform's."""
    from bagualu.ops.registry import kernel

    gates, silu_mul = kernel("linear"), kernel("silu_mul")
    lin = experts_linear or gates
    logits = gates(h_TD, m.router_w)
    if m.router == "softmax_topk":
        w_TK, e_TK = torch.topk(torch.softmax(logits.float(), dim=-1), m.top_k, dim=-1)
        if m.norm_topk_prob:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    else:
        top_TK, e_TK = torch.topk(logits, m.top_k, dim=-1)
        w_TK = torch.softmax(top_TK.float(), dim=-1)
    y = torch.zeros_like(h_TD)
    for e in sorted(set(e_TK.flatten().tolist())):
        tok, j = (e_TK == e).nonzero(as_tuple=True)
        r = h_TD.index_select(0, tok)
        z = lin(silu_mul(lin(r, m.gate_w[e]), lin(r, m.up_w[e])), m.down_w[e]) * w_TK[tok, j].unsqueeze(1)
        y.index_put_((tok,), y.index_select(0, tok) + z.to(y.dtype))
    if m.shared_gate_up_w is not None:
        gate, up = lin(h_TD, m.shared_gate_up_w).chunk(2, dim=-1)
        z = lin(silu_mul(gate, up), m.shared_down_w)
        if m.shared_gate_w is not None:
            z = torch.sigmoid(gates(h_TD, m.shared_gate_w)) * z
        y = y + z
    return y
