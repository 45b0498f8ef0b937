"""``ModelRunner``: one engine step through the model — the S-part here, the R-part in a back-end.

Legend: T tokens of a micro-batch, D model dim, H heads, G KV heads, Dh head dim, R rows to sample, V vocab.

Per decoder layer ``l`` and micro-batch ``m``::

    pre(l, m):   h = input_norm(x);  q, k, v = qkv_tokens(h, rope)      -> backend.submit(l, m, q, k, v)
    post(l, m):  o = backend.wait(l, m);  x += o_proj(o);  x += mlp(post_norm(x))

and the loop interleaves micro-batches so that while the back-end attends micro-batch 1 of layer l the
runner computes post(l, 0) and pre(l+1, 0) — FastDecode's ping-pong of S and R::

    S: pre(0,0) pre(0,1) | post(0,0) pre(1,0) | post(0,1) pre(1,1) | post(1,0) pre(2,0) | ...
    R:        R(0,0)      R(0,1)               R(1,0)               R(1,1)

With the in-process back-end ``submit`` computes at once and one micro-batch is used. There, a model whose
layers ``decoder_layers`` covers (Llama, Mixtral, Qwen2-MoE) runs them as one operator per micro-batch instead
(``EngineConfig.fused_layers``): the same computation, which the CPU platform does in one native call. With
attention in R-workers such a model's S-part runs as that operator's halves (``decoder_layer_halves``): each
``post(l, m) pre(l+1, m)`` above is one call (native on CPU), on the same weights (packed copies included) and
with the same activations policy as the operator.

A half-precision model on a platform whose half GEMMs are fast (bf16 on CPUs with bf16 units) is bandwidth-
bound in a small step and compute-bound in a large one, and the platform's fastest kernel differs between the
two: the half GEMM for many rows, ``linear``'s GEMV reading the half weights as stored for a few. So a step
of at most ``fp32_activation_rows`` tokens runs the operator with fp32 activations over the same half weights
(norm weights and biases widened once: a few KiB), as the platforms without half GEMMs always do. Where the
operator also multiplies half operands natively (``ops.linear_half_operand_dtypes``), a step of up to
``NATIVE_HALF_STEP_TOKENS`` runs it too, with each projection's input rounded to the half dtype (autocast's
rule: ``LayerStack.half_operands``); a larger step runs in the model's dtype. The three differ only in where
activations are rounded: fp32 everywhere, at the GEMMs' inputs, or after every op. Half-operand steps of at
least ``PACKED_MIN_ROWS`` tokens multiply by repacked copies of the dense projections and the LM head where
the platform has such a layout (``ops.linear_packer``; ``EngineConfig.packed_weights``): the same products.
Where the platform multiplies those on a matrix unit (``ops.linear_matrix_unit_dtypes``: AMX) every step the
operator runs takes them, from one token up, and an MoE model's steps of every size (``half_step_tokens``).
Without the operator (``fused_layers=False``, or layers it does not cover) a small step runs the model's own
modules with fp32 activations the same way (they multiply through the platform's ``linear``, which reads the
half weights).
The model is only read (its modules are called); it knows nothing of paging.
"""

from __future__ import annotations

import dataclasses

import torch

from bagualu.engine.batch import StepInputs
from bagualu.models.layers import Attention
from bagualu.moe import MLP, MoE
from bagualu.ops import (kernel, linear_fp32_on_own_threads, linear_half_operand_dtypes, linear_matrix_unit_dtypes,
                         linear_packer, linear_weight_dtypes)
from bagualu.ops.decoder_layers import ROUTERS as STACK_ROUTERS
from bagualu.ops.decoder_layers import LayerWeights, LayerStack, MoEBlock
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


# Up to this many tokens a step with fp32 activations spends its time in the platform's kernels: on CPU the
# layer operator's native call (``ops.decoder_layers_cpu``: with bf16 weights, or fp32 ones on AVX-512 builds)
# or, above the operator's limit, the same kernels composed per layer around a few small torch ops.
NATIVE_STEP_TOKENS = 256
# ... and a half model's steps with half operands up to this many (the linear kernel's row limit for bf16)
NATIVE_HALF_STEP_TOKENS = 256
# ... of which those of at least this many tokens use the repacked projections (EngineConfig.packed_weights).
# Measured on a Zen 5 (2 threads, the ~110M Llama's 12 layers of projections and its LM head, bf16, weights
# from DRAM; row tiles -> packed tiles): 1 row 4.0 -> 6.9 ms, 2-6 rows within 5% either way, 8 rows 5.1 ->
# 4.5, 16 7.5 -> 5.5, 32 12.0 -> 9.1, 64 21.7 -> 16.8; fp32 weights: 1 row 9.5 -> 10.5, 4 rows 11.5 -> 10.4,
# 8 11.5 -> 10.3, 16 14.8 -> 12.3, 32 23.9 -> 16.7, 64 42.8 -> 30.4.
PACKED_MIN_ROWS = 8
# Where the platform multiplies the half operands on a matrix unit (``ops.linear_matrix_unit_dtypes``: AMX),
# every step the operator runs takes half operands and the packed copies, from one token up. Measured on a
# Xeon with AMX (2 threads, the same projections and head, bf16, from DRAM): packed on AMX 1 row 10.6 ms,
# 8 rows 9.3, 32 rows 12.7, against the row tiles' 12.6 (half operands), 31 (8 rows, fp32 activations) and
# 74 (32 rows).
MATRIX_UNIT_PACKED_MIN_ROWS = 1
# ... and an MoE model's steps of every size run so too, where a larger one would otherwise run torch's bf16
# ops: its experts' GEMMs get a new row count at every call, for which oneDNN JIT-compiles a new kernel
# (perf: ~28% of a prefill in OpenMP waits, several % in its code generator), while the operator multiplies
# all of a layer's experts as one job on the packed copies. Small Mixtral bf16, 32 prompts x 128 on the same
# Xeon: prefill 1.2-2.1 s -> 0.96-1.17 s. A dense model keeps oneDNN above NATIVE_HALF_STEP_TOKENS: its
# fixed-shape GEMMs run there at 550-750 GFLOP/s at 2048 rows (the packed AMX tiles 530-650), and a 2048-token
# Llama chunk through the operator measured slower (32 x 128 prefill 2.2-2.4 s against 1.0-1.6).


class UnsupportedModelError(ValueError):
    pass


def check_supported(model) -> None:
    cfg = model.config
    if cfg.mla is not None:
        raise UnsupportedModelError(
            f"{cfg.arch} uses multi-head latent attention (MLA), which the serving engine does not page yet; "
            "serve a grouped-query-attention model (Llama, Mixtral, Qwen2/3-MoE, dots1) or use the reference "
            "decoder (bagualu.models.generate)")


def layer_stack(model) -> LayerStack | None:
    """The model's layers as a ``LayerStack`` when every one has GQA attention without q/k norms (projections
    fused) and a SwiGLU MLP or an MoE block that ``decoder_layers`` routes (see ``_moe_block``), and their norms
    share one epsilon; else None."""
    layers, eps = [], set()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (isinstance(attn, Attention) and attn.q_norm is None and attn.qkv_weight is not None):
            return None
        if isinstance(mlp, MLP) and mlp.gate_up_weight is not None:
            moe, ffn = None, (mlp.gate_up_weight, mlp.gate_up_bias, mlp.down_proj.weight, mlp.down_proj.bias)
        elif isinstance(mlp, MoE) and (moe := _moe_block(mlp)) is not None:
            ffn = (None, None, None, None)
        else:
            return None
        eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
        layers.append(LayerWeights(layer.input_layernorm.weight, attn.qkv_weight, attn.qkv_bias, attn.o_proj.weight,
                                 attn.o_proj.bias, layer.post_attention_layernorm.weight, *ffn, layer.window, moe))
    if not layers or len(eps) != 1:
        return None
    attn = model.model.layers[0].self_attn
    return LayerStack(tuple(layers), attn.H, attn.G, attn.Dh, eps.pop(), attn.scale)


def _moe_block(m: MoE) -> MoEBlock | None:
    """An MoE layer as ``decoder_layers`` takes it: no expert parallelism, dropless, a plain top-k router
    (``softmax_topk`` or ``topk_softmax``, one group, no scaling), shared experts fused and bias-free."""
    r, sh, sg = m.gate, m.shared_experts, m.shared_expert_gate
    if not (m.ep == 1 and m.capacity_factor is None and r.name in STACK_ROUTERS and r.num_groups == 1
            and r.routed_scaling_factor == 1.0):
        return None
    if sh is not None and (sh.gate_up_weight is None or sh.gate_up_bias is not None or sh.down_proj.bias is not None):
        return None
    if sg is not None and sg.bias is not None:
        return None
    ex = m.experts
    return MoEBlock(r.weight, ex.gate_proj, ex.up_proj, ex.down_proj, m.top_k, r.name, r.norm_topk_prob,
                    None if sh is None else sh.gate_up_weight, None if sh is None else sh.down_proj.weight,
                    None if sg is None else sg.weight)


def fp32_activation_steps(model, fp32_activation_rows: int) -> bool:
    """Whether a half model's small steps run with fp32 activations over its half weights: asked for
    (``fp32_activation_rows >= 0``) and the platform's ``linear`` reads those weights as stored."""
    if fp32_activation_rows < 0 or model.dtype not in (torch.bfloat16, torch.float16):
        return False
    attn = model.model.layers[0].self_attn
    w = attn.qkv_weight if getattr(attn, "qkv_weight", None) is not None else attn.q_proj.weight
    return w.dtype in linear_weight_dtypes()


def widened_stack(stack: LayerStack) -> LayerStack:
    """``stack`` for fp32 activations: the same projection weights, its norm weights and biases in fp32."""
    def f(t):
        return None if t is None else t.float()

    return dataclasses.replace(stack, native={}, layers=tuple(
        dataclasses.replace(ly, input_norm=f(ly.input_norm), qkv_b=f(ly.qkv_b), o_b=f(ly.o_b),
                            post_norm=f(ly.post_norm), gate_up_b=f(ly.gate_up_b), down_b=f(ly.down_b))
        for ly in stack.layers))


class ModelRunner:
    def __init__(self, model, backend, *, fused_layers: bool = True, fp32_activation_rows: int = -1,
                 packed_weights: bool = True):
        check_supported(model)
        self.model = model
        model.fuse_projections()  # q/k/v and gate/up as one GEMM each
        self.backend = backend
        # the model's layers as one operator where attention is computed in this process (the back-end runs it
        # with the cache), else as the operator's halves around the back-end's attention
        self.stack = layer_stack(model) if fused_layers else None
        self.in_process_layers = hasattr(backend, "run_layers")
        self.halves = kernel("decoder_layer_halves")
        if self.stack is not None and packed_weights and model.dtype is torch.float32:
            self.stack = dataclasses.replace(self.stack, packed_min_rows=PACKED_MIN_ROWS)
        # (stack, final norm weight) with fp32 activations for a half model's small steps (stack None: the
        # per-layer loop), and the stack with half operands for its mid-size ones (module docstring);
        # fp32_activation_rows < 0: neither
        self.fp32_activation_rows = fp32_activation_rows
        self.packed_min_rows = PACKED_MIN_ROWS
        self.half_step_tokens: int | None = NATIVE_HALF_STEP_TOKENS  # the largest half-operand step (None: any)
        self.wide = self.half = None
        if fp32_activation_steps(model, fp32_activation_rows):
            self.wide = (None if self.stack is None else widened_stack(self.stack), model.model.norm.weight.float())
            wdt = None if self.stack is None else self.stack.layers[0].qkv_w.dtype
            if wdt in linear_half_operand_dtypes():
                if packed_weights and wdt in linear_matrix_unit_dtypes():
                    # half operands on the packed copies beat fp32 activations at every step size
                    self.fp32_activation_rows = 0
                    self.packed_min_rows = MATRIX_UNIT_PACKED_MIN_ROWS
                    if any(ly.moe is not None for ly in self.stack.layers):
                        self.half_step_tokens = None
                self.half = dataclasses.replace(self.wide[0], half_operands=True, native={},
                                                packed_min_rows=self.packed_min_rows if packed_weights else 0)
        # the LM head repacked likewise, for the logits rows of a half model's half steps or of an fp32 model's
        # steps (None: not packed here)
        pack = linear_packer() if packed_weights else None
        self.head_packed = None
        if pack is not None and (self.half is not None or model.dtype is torch.float32):
            self.head_packed = pack(model.lm_head.weight, self.half is not None)
        if self.head_packed is not None:
            log.info("engine: LM head repacked for steps of >= %d tokens, %.0f MiB more", self.packed_min_rows,
                     getattr(self.head_packed, "nbytes", 0) / 2**20)
        self.layers = list(model.model.layers)
        # fp32 GEMMs of every size on the platform's own threads: a large fp32 step is the platform's kernels too.
        # Running its few torch ops on one thread (core.step) keeps torch's spinning OpenMP workers off the
        # cores: fp32 ~110M Llama, 32 prompts x 128, prefill 2.0-2.15 -> ~1.7 s (measured as OMP_WAIT_POLICY=passive)
        self.fp32_own_threads = linear_fp32_on_own_threads()
        self.linear = kernel("linear")  # the platform's GEMM for the S-part (small-M friendly on CPU)
        self.rms_norm = kernel("rms_norm")
        cfg = model.config
        self.H, self.Dh = cfg.num_heads, cfg.dim_head

    def native_step(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` tokens spends its time in the platform's own kernels (the layer operator
        with fp32 activations, up to ``NATIVE_STEP_TOKENS``; an fp32 model's larger steps too where the
        platform's ``linear`` runs fp32 GEMMs of every size on its own threads) rather than in torch's ops."""
        if self.stack is None:
            return False
        if self.model.dtype is torch.float32:  # beyond the operator, its reference composes the same kernels
            return tokens <= NATIVE_STEP_TOKENS or self.fp32_own_threads
        return self._fp32_stack(tokens) is not None

    def _small_fp32(self, tokens: int) -> bool:
        """A half model's step of ``tokens`` is small enough for fp32 activations (operator or per-layer loop)."""
        return self.wide is not None and tokens <= self.fp32_activation_rows

    def _fp32_stack(self, tokens: int) -> LayerStack | None:
        """The stack a half model's step of ``tokens`` runs with fp32 activations; None: in its dtype."""
        if self.stack is not None and self._small_fp32(tokens):
            return self.wide[0]
        if self.half is not None and (self.half_step_tokens is None or tokens <= self.half_step_tokens):
            return self.half
        return None

    @torch.inference_mode()
    def execute(self, mbs: list[StepInputs]) -> list[torch.Tensor | None]:
        """Run one step over its micro-batches; returns, per micro-batch, the logits ``[R + Q, V]`` (fp32) of
        its ``logits_rows`` then its ``prompt_rows`` (None when it has neither)."""
        m = self.model
        live = [i for i, st in enumerate(mbs) if st.num_tokens]
        xs: dict[int, torch.Tensor] = {}
        rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        wide: dict[int, LayerStack | None] = {}  # micro-batches run with fp32 activations, and their stack
        halves: dict[int, LayerStack] = {}  # micro-batches whose stack runs as its halves, around the R-part
        for i in live:
            st = mbs[i]
            self.backend.prepare(i, st)
            xs[i] = m.model.embed_tokens(st.input_ids_T)
            stack = self.stack
            if (fp32 := self._fp32_stack(st.num_tokens)) is not None:
                wide[i] = stack = fp32
                xs[i] = xs[i].float()
            elif self.stack is None and self._small_fp32(st.num_tokens):
                wide[i] = None  # the per-layer loop, its modules called with fp32 activations
                xs[i] = xs[i].float()
            rope[i] = m.rotary.rows(st.positions_T, xs[i].dtype, st.max_position + 1)
            if stack is not None and self.in_process_layers:
                xs[i] = self.backend.run_layers(i, stack, xs[i], *rope[i])
            elif stack is not None:
                halves[i] = stack
                xs[i], q, k, v = self.halves(xs[i], stack, None, None, 0, *rope[i])
                self.backend.submit(0, i, q, k, v)
            else:
                self._pre(0, i, xs[i], rope[i])
        layers = [] if self.stack is not None and self.in_process_layers else self.layers  # []: the operator ran them
        L = len(layers)
        for l, layer in enumerate(layers):
            for i in live:
                x = xs[i]
                o_THDh = self.backend.wait(l, i).to(x.dtype)
                if i in halves:
                    nxt = l + 1 if l + 1 < L else None
                    xs[i], q, k, v = self.halves(x, halves[i], l, o_THDh, nxt, *rope[i])
                    if nxt is not None:
                        self.backend.submit(nxt, i, q, k, v)
                    continue
                o_proj = layer.self_attn.o_proj
                x = x + self.linear(o_THDh.reshape(x.shape[0], self.H * self.Dh), o_proj.weight, o_proj.bias)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                xs[i] = x
                if l + 1 < L:
                    self._pre(l + 1, i, x, rope[i])
        out: list[torch.Tensor | None] = [None] * len(mbs)
        for i in live:
            rows = mbs[i].logits_rows + mbs[i].prompt_rows
            if rows:
                r0, n = rows[0], len(rows)
                # a run of rows (every decode step; a prefill chunk's last row) is a view, not a gather: the
                # first torch ops after the layers stream the weights run cold, so each one saved counts
                x = xs[i][r0:r0 + n] if rows[-1] - r0 == n - 1 and rows == list(range(r0, r0 + n)) \
                    else xs[i][torch.tensor(rows, device=xs[i].device)]
                norm = m.model.norm
                h = self.rms_norm(x, self.wide[1], norm.eps) if i in wide else norm(x)
                half = wide.get(i) is not None and wide[i].half_operands  # the LM head's input as the layers' were
                packed = self.head_packed is not None and n >= self.packed_min_rows and (
                    half if self.half is not None else i not in wide)
                head = self.head_packed if packed else m.lm_head.weight
                out[i] = (self.linear(h, head, half_operands=True) if half else self.linear(h, head)).float()
        return out

    def _pre(self, l: int, i: int, x_TD: torch.Tensor, rope) -> None:
        layer = self.layers[l]
        q, k, v = layer.self_attn.qkv_tokens(layer.input_layernorm(x_TD), *rope)
        self.backend.submit(l, i, q, k, v)
