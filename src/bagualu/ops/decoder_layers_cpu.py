"""The CPU platform's ``decoder_layers``: the layer loop in C (``csrc/decoder_layers_cpu.cpp``), one call per step;
and its ``decoder_layer_halves`` (the same layers around attention computed elsewhere), one call per layer boundary.

The C driver calls the kernels the per-layer path calls — ``linear_cpu``, ``decode_ops_cpu`` (RMSNorm, rope,
KV write), ``paged_attention_cpu`` and ``elementwise_cpu`` (the SwiGLU activation) — through function pointers
taken from their libraries, so each kernel exists once and keeps its own build flags; only the layer loop, the
residual adds and the MoE routing (top-k, softmax, gathering each expert's rows) are new. At batch 1 this removes ~25
interpreter-level calls per MLP layer and ~40 per MoE layer (see the C file).

Covered: inference mode; fp32 activations, norms, biases and cos/sin; projection weights (experts
included) all fp32 or all bf16, an MoE layer's router and shared-expert gate in either; fp32 or bf16 KV
caches; at most ``linear_cpu.MAX_ROWS_BF16`` tokens, or ``MAX_ROWS_FP32`` with fp32 weights where the linear
kernel does not hand its many-row calls to the grouped GEMM (AVX2 builds: above that the BLAS GEMM wins, and
the reference routes each projection to it). Anything else, or a
library that cannot be built: the reference (``ops.decoder_layers.decoder_layers``), which composes the same kernels from Python;
above the row limit it multiplies by the packed projections where the stack has them (``packed_min_rows``).
The stack's pointer table is built once per (stack, caches) and validated then: dtypes, shapes,
contiguity. Per call only the step's tensors are checked; the index values are checked by the kernels
themselves (slots by the KV write, block tables and lengths by attention) before they read the cache.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from bagualu.ops import decode_ops_cpu, elementwise_cpu, gemm_cpu, linear_cpu, native, paged_attention_cpu
from bagualu.ops.decoder_layers import ROUTERS, LayerStack
from bagualu.ops.decoder_layers import decoder_layer_halves as halves_reference
from bagualu.ops.decoder_layers import decoder_layers as reference
from bagualu.ops.threads import kernel_threads
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

_p, _i = ctypes.c_void_p, ctypes.c_int64
_W_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class _Kernels(ctypes.Structure):
    _fields_ = [("linear", _p), ("linear_group", _p), ("rms_norm", _p), ("rope", _p), ("write_kv", _p),
                ("attention", _p), ("silu_mul", _p)]


class _MoE(ctypes.Structure):
    _fields_ = [(n, _p) for n in ("router_w", "gate_w", "up_w", "down_w", "shared_gu_w", "shared_down_w",
                                  "shared_gate_w")] + [(n, _i) for n in ("E", "K", "F", "Fs", "router", "norm_topk", "gate_dtype")] \
        + [(n, _p) for n in ("gate_wp", "up_wp", "down_wp")]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _p), ("qkv_w", _p), ("qkv_b", _p), ("o_w", _p), ("o_b", _p), ("ln2", _p), ("gu_w", _p),
                ("gu_b", _p), ("down_w", _p), ("down_b", _p), ("k_cache", _p), ("v_cache", _p), ("moe", _p),
                ("w_dtype", _i), ("window", _i)]


class _Dims(ctypes.Structure):
    _fields_ = [(n, _i) for n in ("D", "H", "G", "Dh", "F", "Dr", "N", "Bs", "kv_bf16", "threads", "min_work",
                                  "chunk_work")] + [("eps", ctypes.c_double), ("scale", ctypes.c_double)]


class _Step(ctypes.Structure):
    _fields_ = [("T", _i), ("S", _i), ("M", _i), ("cos", _p), ("sin", _p), ("slots", _p), ("block_tables", _p),
                ("context_lens", _p), ("qsl", _p)]


class _Scratch(ctypes.Structure):
    _fields_ = [(n, _p) for n in ("h", "qkv", "q", "k", "o", "y", "gu", "a", "logits", "rows", "z", "route_w",
                                  "route_e")]


class _Driver:
    """The loaded driver and the kernel table it calls."""

    def __init__(self, lib: ctypes.CDLL, kernels: _Kernels):
        self.run = lib.bgl_decoder_layers
        self.run.restype = ctypes.c_int
        self.run.argtypes = [_p, _p, _i, _p, _p, _p, _p, _p]
        self.halves = lib.bgl_decoder_layer_halves
        self.halves.restype = None
        self.halves.argtypes = [_p, _p, _p, _p, _p, _p, _i, _p, _i, _p, _p, _p]
        self.kernels = kernels
        # steps of up to this many tokens with fp32 weights: as many as with bf16 ones where the linear kernel
        # hands its many-row calls to the grouped GEMM (measured on a Zen 5, ~110M Llama fp32 decode, ms per
        # step in the operator vs the per-layer reference: 64 rows 55 vs 61, 96 rows 81 vs 87, 128 rows 96 vs 106)
        self.max_rows_fp32 = linear_cpu.MAX_ROWS_BF16 if gemm_cpu.linear_handoff_rows() else linear_cpu.MAX_ROWS_FP32


_driver: _Driver | None | bool = False


def driver() -> _Driver | None:
    """The driver, or None when it or one of the kernel libraries it calls cannot be built."""
    global _driver
    if _driver is False:
        gemm_cpu._loaded()  # sets the linear kernel's hand-off of many-row calls to the grouped GEMM
        libs = (native.load("decoder_layers_cpu", "decoder_layers_cpu.cpp"), linear_cpu.library(),
                decode_ops_cpu.library(), paged_attention_cpu.kernel(), elementwise_cpu.library())
        if any(lib is None for lib in libs):
            _driver = None
        else:
            lib, lin, dops, attn, elem = libs
            fn = lambda f: ctypes.cast(f, _p).value  # noqa: E731
            _driver = _Driver(lib, _Kernels(fn(lin.bgl_linear), fn(lin.bgl_linear_group), fn(dops.bgl_rms_norm),
                                            fn(dops.bgl_rope), fn(dops.bgl_write_kv), fn(attn.lib.bgl_paged_attention),
                                            fn(elem.bgl_silu_mul)))
    return _driver


def _vec(t: torch.Tensor | None, n: int) -> bool:
    return t is None or (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == (n,))


def _table(stack: LayerStack, caches) -> tuple | None:
    """(layer array, dims, weight dtype, scratch floats per token, the MoE structures the layer array points
    into) for ``stack`` over ``caches``, built once per set of caches; None if not covered. ``caches`` None:
    the layers without their attention (``decoder_layer_halves``)."""
    key = None if caches is None else tuple((k.data_ptr(), v.data_ptr()) for k, v in caches)
    hit = stack.native.get("cpu" if caches is not None else "cpu-halves")
    if hit is not None and hit[0] == key:
        return hit[1]
    table = _build(stack, caches)
    stack.native["cpu" if caches is not None else "cpu-halves"] = (key, table)
    return table


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ok(w: torch.Tensor | None, dtype: torch.dtype, shape: tuple) -> bool:
    return w is not None and w.dtype is dtype and w.is_cpu and w.is_contiguous() and w.shape == shape


def _moe(m, wdt, D) -> tuple[_MoE, int] | None:
    """The C description of an MoE block and its shared experts' width; None if not covered."""
    E, F = m.gate_w.shape[0], m.gate_w.shape[1] if m.gate_w.dim() == 3 else -1
    Fs = m.shared_down_w.shape[1] if m.shared_down_w is not None and m.shared_down_w.dim() == 2 else 0
    gdt = m.router_w.dtype  # the gates' (router, shared-expert gate) own dtype: the experts' or wider
    ok = (gdt in _W_DTYPES and _ok(m.router_w, gdt, (E, D)) and _ok(m.gate_w, wdt, (E, F, D)) and _ok(m.up_w, wdt, (E, F, D))
          and _ok(m.down_w, wdt, (E, D, F)) and 1 <= m.top_k <= E
          and (m.shared_gate_up_w is None) == (m.shared_down_w is None)
          and (m.shared_gate_up_w is None or (_ok(m.shared_gate_up_w, wdt, (2 * Fs, D))
                                              and _ok(m.shared_down_w, wdt, (D, Fs))))
          and (m.shared_gate_w is None or (Fs and _ok(m.shared_gate_w, gdt, (1, D)))))
    if not ok:
        return None
    ptr = _addr
    return _MoE(m.router_w.data_ptr(), m.gate_w.data_ptr(), m.up_w.data_ptr(), m.down_w.data_ptr(),
                ptr(m.shared_gate_up_w), ptr(m.shared_down_w), ptr(m.shared_gate_w), E, m.top_k, F, Fs,
                ROUTERS.index(m.router), int(m.norm_topk_prob), _W_DTYPES[gdt]), Fs


def _build(stack: LayerStack, caches) -> tuple | None:
    if not stack.layers or (caches is not None and len(caches) != len(stack.layers)):
        return None
    H, G, Dh = stack.num_heads, stack.num_kv_heads, stack.head_dim
    first = stack.layers[0]
    D = first.input_norm.shape[0]
    mlps = [ly for ly in stack.layers if ly.moe is None]
    F = mlps[0].down_w.shape[1] if mlps and mlps[0].down_w is not None and mlps[0].down_w.dim() == 2 else 0
    wdt = first.qkv_w.dtype
    if caches is None:  # no attention here: the layers' weights alone
        k0 = torch.empty(0, G, 1, Dh)
        caches = [(k0, k0)] * len(stack.layers)
    k0 = caches[0][0]
    if wdt not in _W_DTYPES or k0.dtype not in (torch.float32, torch.bfloat16) or k0.dim() != 4 or H % G:
        return None
    N, Gc, Bs, Dhc = k0.shape
    if (Gc, Dhc) != (G, Dh):
        return None
    Q = (H + 2 * G) * Dh
    code = linear_cpu.HALF_OPERANDS if stack.half_operands and wdt is torch.bfloat16 else _W_DTYPES[wdt]
    rows, moes, widest, E_max, K_max = [], [], F, 1, 1
    for ly, (kc, vc) in zip(stack.layers, caches):
        weights = ((ly.qkv_w, (Q, D)), (ly.o_w, (D, H * Dh)))
        if ly.moe is None:
            weights += ((ly.gate_up_w, (2 * F, D)), (ly.down_w, (D, F)))
        if not all(_ok(w, wdt, shape) for w, shape in weights):
            return None
        if not (_vec(ly.input_norm, D) and _vec(ly.post_norm, D) and ly.input_norm is not None
                and ly.post_norm is not None and _vec(ly.qkv_b, Q) and _vec(ly.o_b, D)):
            return None
        if ly.moe is None and not (_vec(ly.gate_up_b, 2 * F) and _vec(ly.down_b, D)):
            return None
        if not (kc.shape == k0.shape == vc.shape and kc.dtype is k0.dtype is vc.dtype and kc.is_cpu and vc.is_cpu
                and kc.is_contiguous() and vc.is_contiguous()):
            return None
        moe = None
        if ly.moe is not None:
            got = _moe(ly.moe, wdt, D)
            if got is None:
                return None
            moe, shared = got
            moes.append(moe)
            widest = max(widest, moe.K * moe.F, shared)
            E_max, K_max = max(E_max, moe.E), max(K_max, moe.K)
        ptr = _addr
        rows.append(_Layer(ptr(ly.input_norm), ptr(ly.qkv_w), ptr(ly.qkv_b), ptr(ly.o_w), ptr(ly.o_b),
                           ptr(ly.post_norm), ptr(ly.gate_up_w), ptr(ly.gate_up_b), ptr(ly.down_w), ptr(ly.down_b),
                           kc.data_ptr(), vc.data_ptr(), None if moe is None else ctypes.addressof(moe),
                           code, ly.window or 0))
    layers = (_Layer * len(rows))(*rows)
    packed = _packed_layers(stack, rows, code, moes)
    dims = _Dims(D, H, G, Dh, F, 0, N, Bs, int(k0.dtype is torch.bfloat16), 1, linear_cpu.MIN_WORK_PER_THREAD,
                 linear_cpu.CHUNK_WORK, stack.eps, stack.scale)
    # per token: h, qkv, q, k, o, y, gu, a, logits, rows, z, route_w (fp32) and route_e (int64, 2 slots each);
    # an MoE layer's gu/a/rows/z hold its K routes per token (csrc: moe_block)
    sizes = (D, Q, H * Dh, G * Dh, H * Dh, D, 2 * widest, widest, E_max, K_max * D, K_max * D, K_max, 2 * K_max)
    return layers, dims, wdt, sizes, moes, packed  # moes: the structures the layer array points into, kept alive


def _packed_layers(stack: LayerStack, rows: list, code: int, moes: list) -> tuple | None:
    """(layer array on packed projections, the packed weights and MoE structures it points into, ``stack``
    with its projections packed — an MoE layer's experts as per-expert views of the same packing: the
    reference's for steps above the operator's row limit) for
    ``stack.packed_min_rows``; None where it does not apply (no packed tiles here for these weights, bf16
    weights without half operands, odd widths, experts whose widths are not multiples of 16)."""
    dtype = {linear_cpu.HALF_OPERANDS: torch.bfloat16, _W_DTYPES[torch.float32]: torch.float32}.get(code)
    if not (stack.packed_min_rows > 0 and dtype is not None and linear_cpu.packed_available(dtype)):
        return None
    dense = [w for ly in stack.layers for w in (ly.qkv_w, ly.o_w, ly.gate_up_w, ly.down_w) if w is not None]
    if dtype is torch.bfloat16 and any(w.shape[1] % 2 for w in dense):
        return None
    if any(ly.moe is not None and (ly.moe.gate_w.shape[1] % 16 or ly.moe.gate_w.shape[2] % 16) for ly in stack.layers):
        return None  # a packed expert must take what an unpacked one does: E x [F, D] and E x [D, F], back to back
    pack = linear_cpu.pack_bf16 if dtype is torch.bfloat16 else linear_cpu.pack_f32
    keep, out = [], []

    def experts(p: linear_cpu.PackedWeight, E: int) -> tuple:
        """Expert e's rows of ``p`` (E experts' matrices packed as one; with their row counts multiples of 16,
        expert e's tiles are a contiguous run): a view each, for the reference."""
        n = p.N // E
        return tuple(linear_cpu.PackedWeight(p.data[e * n // 16:(e + 1) * n // 16], n, p.K, p.code) for e in range(E))

    ref_layers = []  # the same packed weights, for the reference
    for row, ly in zip(rows, stack.layers):
        r = _Layer.from_buffer_copy(row)
        names = ("qkv_w", "o_w") + (("gate_up_w", "down_w") if ly.moe is None else ())
        ref = {n: pack(getattr(ly, n)) for n in names}
        keep.extend(ref.values())
        r.qkv_w, r.o_w = ref["qkv_w"].data.data_ptr(), ref["o_w"].data.data_ptr()
        if ly.moe is None:
            r.gu_w, r.down_w = ref["gate_up_w"].data.data_ptr(), ref["down_w"].data.data_ptr()
        else:  # the experts packed as one matrix each: with F, D multiples of 16 expert e starts at e F D
            m = ly.moe
            E, F, D = m.gate_w.shape
            mo = _MoE.from_buffer_copy(ctypes.cast(r.moe, ctypes.POINTER(_MoE)).contents)
            gate, up, down = (pack(w) for w in (m.gate_w.reshape(E * F, D), m.up_w.reshape(E * F, D),
                                                m.down_w.reshape(E * D, F)))
            keep.extend((gate, up, down))
            mo.gate_wp, mo.up_wp, mo.down_wp = (p.data.data_ptr() for p in (gate, up, down))
            # the reference's MoE block indexes its experts' weights: per-expert views of the same packing
            ref_moe = {"gate_w": experts(gate, E), "up_w": experts(up, E), "down_w": experts(down, E)}
            if m.shared_gate_up_w is not None:
                ref_moe["shared_gate_up_w"] = pack(m.shared_gate_up_w)
                ref_moe["shared_down_w"] = pack(m.shared_down_w)
                keep.extend((ref_moe["shared_gate_up_w"], ref_moe["shared_down_w"]))
                mo.shared_gu_w = ref_moe["shared_gate_up_w"].data.data_ptr()
                mo.shared_down_w = ref_moe["shared_down_w"].data.data_ptr()
            keep.append(mo)
            r.moe = ctypes.addressof(mo)
            ref["moe"] = dataclasses.replace(m, **ref_moe)
        r.w_dtype = keep[0].code
        out.append(r)
        ref_layers.append(dataclasses.replace(ly, **ref))
    log.info("decoder layers: projections repacked for steps of >= %d tokens, %.0f MiB more",
             stack.packed_min_rows, sum(p.nbytes for p in keep if isinstance(p, linear_cpu.PackedWeight)) / 2**20)
    return (_Layer * len(out))(*out), keep, dataclasses.replace(stack, layers=tuple(ref_layers), native={})


def _rows_ok(x_TD: torch.Tensor, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor, dims: _Dims) -> bool:
    """The step's hidden states and rotary rows are what the C driver takes."""
    T, Dr = x_TD.shape[0] if x_TD.dim() == 2 else -1, cos_TDr.shape[-1]
    return (T >= 1 and x_TD.dtype is torch.float32 and x_TD.is_cpu and x_TD.shape[1] == dims.D
            and all(c.dtype is torch.float32 and c.is_cpu and c.is_contiguous() and c.shape == (T, Dr)
                    for c in (cos_TDr, sin_TDr))
            and 0 < Dr <= dims.Dh and Dr % 2 == 0)


def _native_rows(drv: _Driver, wdt: torch.dtype) -> int:
    return linear_cpu.MAX_ROWS_BF16 if wdt is torch.bfloat16 else drv.max_rows_fp32


def _scratch(T: int, sizes) -> tuple[torch.Tensor, _Scratch]:
    """One fp32 buffer carved into the driver's scratch regions for ``T`` tokens (64-byte aligned)."""
    spans = [-(-T * n // 16) * 16 for n in sizes]
    buf = torch.empty(sum(spans), dtype=torch.float32)
    ptrs, off = [], buf.data_ptr()
    for n in spans:
        ptrs.append(off)
        off += n * 4
    return buf, _Scratch(*ptrs)


def _step_dims(dims: _Dims, Dr: int) -> _Dims:
    dims = _Dims.from_buffer_copy(dims)  # the stack's copy stays as built
    dims.Dr, dims.threads = Dr, kernel_threads()
    return dims


def _native(stack: LayerStack, caches, x_TD: torch.Tensor) -> tuple | None:
    """(driver, the stack's table, T, whether this step takes the packed layers), in inference mode where the
    driver builds and the stack is covered; else None (the reference)."""
    drv = driver() if torch.is_inference_mode_enabled() else None
    table = _table(stack, caches) if drv is not None else None
    if table is None:
        return None
    T = x_TD.shape[0] if x_TD.dim() == 2 else -1
    return drv, table, T, table[-1] is not None and T >= stack.packed_min_rows


def decoder_layers(x_TD: torch.Tensor, stack: LayerStack, caches, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor,
                 block_tables_SM: torch.Tensor, context_lens_S: torch.Tensor, query_start_loc_S1: torch.Tensor,
                 slot_mapping_T: torch.Tensor) -> torch.Tensor:
    """``ops.decoder_layers.decoder_layers`` in one C call where covered (see the module docstring)."""
    args = (x_TD, stack, caches, cos_TDr, sin_TDr, block_tables_SM, context_lens_S, query_start_loc_S1, slot_mapping_T)
    got = _native(stack, caches, x_TD)
    if got is None:
        return reference(*args)
    drv, (layers, dims, wdt, sizes, _, packed), T, packed_step = got
    if packed_step:
        layers = packed[0]
    S = context_lens_S.shape[0] if context_lens_S.dim() == 1 else -1
    ok = (_rows_ok(x_TD, cos_TDr, sin_TDr, dims)
          and slot_mapping_T.dtype is torch.int64 and slot_mapping_T.shape == (T,) and slot_mapping_T.is_cpu
          and all(t.dtype is torch.int32 and t.is_cpu for t in (block_tables_SM, context_lens_S, query_start_loc_S1))
          and block_tables_SM.dim() == 2 and block_tables_SM.shape[0] == S and query_start_loc_S1.shape == (S + 1,))
    if not ok:
        return reference(*args)
    if T > _native_rows(drv, wdt):
        # above the operator's row limit the reference composes the same kernels per layer, multiplying by
        # the packed projections where they exist (fp32 at 2048 rows, 2 threads, Zen 5: ~450 GFLOP/s
        # against the grouped GEMM's ~395)
        return reference(x_TD, packed[2], *args[2:]) if packed_step else reference(*args)
    dims = _step_dims(dims, cos_TDr.shape[-1])
    _buf, scratch = _scratch(T, sizes)  # _buf: alive until the call returns
    x = x_TD.contiguous().clone()
    bt, cl, qsl, slots = (t.contiguous() for t in (block_tables_SM, context_lens_S, query_start_loc_S1, slot_mapping_T))
    step = _Step(T, S, bt.shape[1], cos_TDr.data_ptr(), sin_TDr.data_ptr(), slots.data_ptr(), bt.data_ptr(),
                 cl.data_ptr(), qsl.data_ptr())
    err = (_i * 4)()
    code = drv.run(ctypes.byref(drv.kernels), layers, len(layers), ctypes.byref(dims), ctypes.byref(step),
                   ctypes.byref(scratch), x.data_ptr(), err)
    if code == 1:
        raise decode_ops_cpu.slot_error(err[0], err[1], dims.N * dims.Bs)
    if code:
        raise ValueError(paged_attention_cpu.index_error_message(code - 10, list(err)[:3], T, bt.shape[1], dims.N))
    return x


def decoder_layer_halves(x_TD: torch.Tensor, stack: LayerStack, post: int | None, o_THDh: torch.Tensor | None,
                         pre: int | None, cos_TDr: torch.Tensor, sin_TDr: torch.Tensor):
    """``ops.decoder_layers.decoder_layer_halves`` in one C call where covered (as ``decoder_layers``, without
    the caches); ``x_TD`` is then updated in place when it is contiguous."""
    args = (x_TD, stack, post, o_THDh, pre, cos_TDr, sin_TDr)
    got = _native(stack, None, x_TD)
    if got is None:
        return halves_reference(*args)
    drv, (layers, dims, wdt, sizes, _, packed), T, packed_step = got
    L = len(layers)
    ok = (_rows_ok(x_TD, cos_TDr, sin_TDr, dims) and (post is not None or pre is not None)
          and (post is None or (0 <= post < L and o_THDh is not None and o_THDh.dtype is torch.float32
                                and o_THDh.is_cpu and o_THDh.numel() == T * dims.H * dims.Dh))
          and (pre is None or 0 <= pre < L))
    if not ok:
        return halves_reference(*args)
    if T > _native_rows(drv, wdt):  # as decoder_layers: the reference on the packed projections where they exist
        return halves_reference(x_TD, packed[2], *args[2:]) if packed_step else halves_reference(*args)
    if packed_step:
        layers = packed[0]
    dims = _step_dims(dims, cos_TDr.shape[-1])
    _buf, scratch = _scratch(T, sizes)  # _buf: alive until the call returns
    x = x_TD if x_TD.is_contiguous() else x_TD.contiguous()
    o = None if post is None else o_THDh.contiguous()
    H, G, Dh = dims.H, dims.G, dims.Dh
    q, k, v = ((torch.empty(T, n, Dh) for n in (H, G, G)) if pre is not None else (None,) * 3)
    step = _Step(T, 0, 0, cos_TDr.data_ptr(), sin_TDr.data_ptr(), None, None, None, None)
    drv.halves(ctypes.byref(drv.kernels), layers, ctypes.byref(dims), ctypes.byref(step), ctypes.byref(scratch),
               x.data_ptr(), -1 if post is None else post, None if o is None else o.data_ptr(),
               -1 if pre is None else pre, *(None if t is None else t.data_ptr() for t in (q, k, v)))
    return x, q, k, v
