"""The CPU platform's ``rms_norm``, ``apply_rope``, ``write_kv`` and ``argmax_rows``: one C call each
(``csrc/decode_ops_cpu.cpp``).

Same signatures and semantics as ``ops.reference`` / ``ops.paged_kv``. Only inference takes the C path
(``torch.inference_mode``, as the serving engine runs): training, ``torch.compile`` tracing and anything
needing autograd keep the reference, so they see no change at all. Covered: fp32 activations and
weights, rotate-half rope, fp32 or bf16 KV caches with int64 slot mappings; and bf16 throughout (a bf16
model's large steps: RMSNorm with a bf16 weight, rope with bf16 cos/sin, bf16 k/v into a bf16 cache),
rounding where the reference's bf16 ops round, split among the kernel threads. Everything else goes to
the reference. Built on first use (``ops.native``); when the build is unavailable the reference runs.

Legend: B batch, H heads, G KV heads, S sequence, Dh head dim, Dr rotated features, T tokens, N blocks,
Bs block size, M rows, D features.
"""

from __future__ import annotations

import ctypes

import torch

from bagualu.ops import linear_cpu, native, paged_kv, reference
from bagualu.ops.threads import kernel_threads

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_lib: ctypes.CDLL | None | bool = False


def library() -> ctypes.CDLL | None:
    """The compiled library with its signatures declared; None when it is unavailable (built on first use)."""
    global _lib
    if _lib is False:
        lib = native.load("decode_ops_cpu", "decode_ops_cpu.cpp", ("-ffp-contract=off",))
        if lib is not None:
            lib.bgl_rms_norm.restype = None
            lib.bgl_rms_norm.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _f32]
            lib.bgl_rope.restype = None
            lib.bgl_rope.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
                                     _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr]
            lib.bgl_write_kv.restype = ctypes.c_int
            lib.bgl_write_kv.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, ctypes.c_int, _ptr, _i64,
                                         _i64, _i64, _i64, _i64, _ptr]
            lib.bgl_rms_norm_bf16.restype = None
            lib.bgl_rms_norm_bf16.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _f32, ctypes.c_int]
            lib.bgl_rope_bf16.restype = None
            lib.bgl_rope_bf16.argtypes = lib.bgl_rope.argtypes + [ctypes.c_int]
            lib.bgl_write_kv_bf16.restype = ctypes.c_int
            lib.bgl_write_kv_bf16.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                                              _i64, _i64, _ptr]
            linear_cpu.share_helpers(lib, "bgl_decode_adopt_helpers")
            lib.bgl_argmax_simd.restype = ctypes.c_int
            lib.argmax_simd = bool(lib.bgl_argmax_simd())  # asked once: a property of the build
            lib.bgl_argmax_rows.restype = None
            lib.bgl_argmax_rows.argtypes = [_ptr, _i64, _i64, _i64, _ptr]
        _lib = lib
    return _lib


def _cpu_of(dtype: torch.dtype, *ts: torch.Tensor) -> bool:
    return all(t.dtype is dtype and t.is_cpu for t in ts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    half = _cpu_of(torch.bfloat16, x, weight)
    if not (torch.is_inference_mode_enabled() and (half or _cpu_of(torch.float32, x, weight)) and x.dim() >= 1
            and weight.dim() == 1 and weight.shape[0] == x.shape[-1] and x.stride(-1) == 1 and weight.is_contiguous()):
        return reference.rms_norm(x, weight, eps)
    lib = library()
    if lib is None:
        return reference.rms_norm(x, weight, eps)
    D = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, D)
    if x2.dim() != 2 or (x2.shape[0] > 1 and x2.stride(0) < D):
        return reference.rms_norm(x, weight, eps)
    y = torch.empty(x.shape, dtype=x.dtype)
    if half:
        lib.bgl_rms_norm_bf16(x2.data_ptr(), x2.stride(0), weight.data_ptr(), y.data_ptr(), x2.shape[0], D, eps,
                              kernel_threads())
    else:
        lib.bgl_rms_norm(x2.data_ptr(), x2.stride(0), weight.data_ptr(), y.data_ptr(), x2.shape[0], D, eps)
    return y


def apply_rope(q_BHSDh: torch.Tensor, k_BGSDh: torch.Tensor, cos_BSDh: torch.Tensor, sin_BSDh: torch.Tensor):
    q, k, cos, sin = q_BHSDh, k_BGSDh, cos_BSDh, sin_BSDh
    half = _cpu_of(torch.bfloat16, q, k, cos, sin)
    ok = (torch.is_inference_mode_enabled() and (half or _cpu_of(torch.float32, q, k, cos, sin)) and q.dim() == 4
          and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride())
    if ok:
        B, H, S, Dh = q.shape
        Dr = cos.shape[-1]
        ok = (k.shape[0] == B and k.shape[2] == S and k.shape[3] == Dh and Dr <= Dh and Dr % 2 == 0
              and q.stride(3) == 1 and k.stride(3) == 1 and cos.stride(2) == 1 and cos.shape[0] in (1, B)
              and cos.shape[1] == S)
    lib = library() if ok else None
    if lib is None:
        return reference.apply_rope(q, k, cos, sin)
    G = k.shape[1]
    cb = cos.stride(0) if cos.shape[0] == B else 0  # a batch of 1 broadcasts
    q_out = torch.empty((B, H, S, Dh), dtype=q.dtype)
    k_out = torch.empty((B, G, S, Dh), dtype=q.dtype)
    args = (q.data_ptr(), H, *q.stride()[:3], k.data_ptr(), G, *k.stride()[:3], B, S, Dh, cos.data_ptr(),
            sin.data_ptr(), cb, cos.stride(1), Dr, q_out.data_ptr(), k_out.data_ptr())
    if half:
        lib.bgl_rope_bf16(*args, kernel_threads())
    else:
        lib.bgl_rope(*args)
    return q_out, k_out


def write_kv(k_cache_NGBDh: torch.Tensor, v_cache_NGBDh: torch.Tensor, k_TGDh: torch.Tensor, v_TGDh: torch.Tensor,
             slot_mapping_T: torch.Tensor) -> None:
    kc, vc = k_cache_NGBDh, v_cache_NGBDh
    half = _cpu_of(torch.bfloat16, k_TGDh, v_TGDh)  # bf16 rows into a bf16 cache: copied as they are
    ok = (torch.is_inference_mode_enabled()
          and (_cpu_of(torch.float32, k_TGDh, v_TGDh) or (half and kc.dtype is torch.bfloat16))
          and kc.dtype in (torch.float32, torch.bfloat16)
          and vc.dtype is kc.dtype and kc.is_cpu and vc.is_cpu and slot_mapping_T.dtype is torch.int64
          and slot_mapping_T.dim() == 1 and slot_mapping_T.is_cpu and kc.dim() == 4 and kc.shape == vc.shape
          and kc.is_contiguous() and vc.is_contiguous() and k_TGDh.dim() == 3 and v_TGDh.dim() == 3
          and k_TGDh.shape == v_TGDh.shape and k_TGDh.shape[0] == slot_mapping_T.shape[0]
          and k_TGDh.shape[1:] == (kc.shape[1], kc.shape[3]) and k_TGDh.stride(2) == 1 and v_TGDh.stride(2) == 1)
    lib = library() if ok else None
    if lib is None:  # also raises the reference's errors for malformed inputs
        return paged_kv.write_kv(kc, vc, k_TGDh, v_TGDh, slot_mapping_T)
    N, G, Bs, Dh = kc.shape
    T = k_TGDh.shape[0]
    slots = slot_mapping_T.contiguous()
    lo_hi = (_i64 * 2)()
    src = (k_TGDh.data_ptr(), k_TGDh.stride(0), k_TGDh.stride(1), v_TGDh.data_ptr(), v_TGDh.stride(0), v_TGDh.stride(1),
           kc.data_ptr(), vc.data_ptr())
    if half:
        bad = lib.bgl_write_kv_bf16(*src, slots.data_ptr(), T, G, Dh, N, Bs, lo_hi)
    else:
        bad = lib.bgl_write_kv(*src, int(kc.dtype is torch.bfloat16), slots.data_ptr(), T, G, Dh, N, Bs, lo_hi)
    if bad:
        raise slot_error(lo_hi[0], lo_hi[1], N * Bs)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the greedy pick over a vocabulary): vectorised on AVX-512 builds, for fp32 rows."""
    lib = library() if (torch.is_inference_mode_enabled() and _cpu_of(torch.float32, x) and x.dim() >= 1
                        and x.shape[-1] > 0 and x.stride(-1) == 1) else None
    if lib is None or not lib.argmax_simd:
        return reference.argmax_rows(x)
    n = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, n)  # unit last stride either way (a view, or a contiguous copy)
    out = torch.empty(x.shape[:-1], dtype=torch.int64)
    lib.bgl_argmax_rows(x2.data_ptr(), x2.stride(0), x2.shape[0], n, out.data_ptr())
    return out


def slot_error(lo: int, hi: int, capacity: int) -> ValueError:
    """What a slot mapping outside the cache raises (``bgl_write_kv`` reports its min and max)."""
    return ValueError(f"slot_mapping values must lie in [0, num_blocks*block_size={capacity}); got min {lo}, max {hi}")
