"""The CPU platform's ``grouped_mm``: ``csrc/gemm_cpu.cpp`` (packed, cache-blocked AVX2/AVX-512 GEMM) via ctypes.

Same semantics as ``ops.reference.grouped_mm``: ``out (+)= a @ b`` for every ``(a, b, out, accumulate)``, all
problems of a call as one job on the caller and the helper threads (the linear kernel's pool, adopted), so
an MoE layer's per-expert GEMMs keep both cores busy to the end. Operands are fp32 or bf16 in any 2-D
strided layout (a transposed view is packed, not copied); ``out`` is fp32 or bf16 with unit column stride.
Problems outside that — other dtypes or devices, operands that need gradients — go to the reference, one
``torch.mm`` each. Built on first use (``ops.native``); when the build is unavailable every call goes to
the reference after one warning.

Summation order differs from the BLAS (blocks of 256 along K, 512 for bf16 pairs; fp32 accumulators), so
results agree with ``torch.mm`` to fp32 rounding, not bit for bit; on CPUs with AVX512-BF16 a bf16 x bf16
problem uses the bf16 dot-product instruction, which flushes denormals to zero. ``isa`` names the build:
scalar, avx2, avx512 or avx512-bf16.
"""

from __future__ import annotations

import ctypes

import torch

from bagualu.ops import linear_cpu, native, reference
from bagualu.ops.threads import kernel_threads

_DTYPES = (torch.float32, torch.bfloat16)
_A_BF16, _B_BF16, _C_BF16, _ACCUMULATE = 1, 2, 4, 8
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ISA = ("scalar", "avx2", "avx512", "avx512-bf16")  # bgl_gemm_simd()'s codes
# From this many rows the linear kernel's calls run on this one, on AVX-512 builds. Measured on a Zen 5 with
# ~110M Llama shapes, GFLOP/s of the linear kernel's 512-bit row tiles vs this kernel: 32 rows 245-307 vs
# 173-266, 64 rows 286-342 vs 237-347, 128 rows 336-410 vs 331-412 (packing the weight is a pass over it that
# few rows do not pay back). On AVX2 the linear kernel keeps them (its thresholds were measured there).
LINEAR_HANDOFF_ROWS = 128


class MM(ctypes.Structure):
    """One problem (mirrors ``BglMM`` in ``csrc/gemm_cpu.cpp``)."""

    _fields_ = [("a", _ptr), ("sa_m", _i64), ("sa_k", _i64), ("b", _ptr), ("sb_k", _i64), ("sb_n", _i64),
                ("c", _ptr), ("ldc", _i64), ("M", _i64), ("N", _i64), ("K", _i64), ("flags", _i64)]


class GroupedGemmKernel:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self._run = lib.bgl_gemm_group
        self._run.restype = None
        self._run.argtypes = [_ptr, _i64, ctypes.c_int]
        lib.bgl_gemm_simd.restype = ctypes.c_int
        self.isa = _ISA[lib.bgl_gemm_simd()]
        self.simd = self.isa != "scalar"

    def __call__(self, problems) -> None:
        ours, rest = [], []
        for p in problems:
            (ours if covers(*p) else rest).append(p)
        if rest:
            reference.grouped_mm(rest)
        if not ours:
            return
        arr = (MM * len(ours))()
        for s, (a, b, out, accumulate) in zip(arr, ours):
            s.a, s.sa_m, s.sa_k = a.data_ptr(), a.stride(0), a.stride(1)
            s.b, s.sb_k, s.sb_n = b.data_ptr(), b.stride(0), b.stride(1)
            s.c, s.ldc = out.data_ptr(), out.stride(0)
            s.M, s.K = a.shape
            s.N = b.shape[1]
            s.flags = ((_A_BF16 if a.dtype is torch.bfloat16 else 0) | (_B_BF16 if b.dtype is torch.bfloat16 else 0)
                       | (_C_BF16 if out.dtype is torch.bfloat16 else 0) | (_ACCUMULATE if accumulate else 0))
        self._run(arr, len(ours), kernel_threads())


def covers(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> bool:
    """What the native kernel computes: 2-D CPU tensors, fp32/bf16, matching shapes, ``out`` with unit column
    stride and no gradient to record (it writes through raw pointers)."""
    return (a.dtype in _DTYPES and b.dtype in _DTYPES and out.dtype in _DTYPES
            and a.dim() == 2 and b.dim() == 2 and out.dim() == 2
            and a.device.type == "cpu" and b.device.type == "cpu" and out.device.type == "cpu"
            and a.shape[1] == b.shape[0] and out.shape == (a.shape[0], b.shape[1])
            and (out.stride(1) == 1 or out.shape[1] <= 1) and out.stride(0) >= out.shape[1]
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or out.requires_grad)))


_kernel: GroupedGemmKernel | None | bool = False


def _loaded() -> GroupedGemmKernel | None:
    global _kernel
    if _kernel is False:
        lib = native.load("gemm_cpu", "gemm_cpu.cpp")
        _kernel = None
        if lib is not None:
            _kernel = GroupedGemmKernel(lib)
            linear_cpu.share_helpers(lib, "bgl_gemm_adopt_helpers")
            lin = linear_cpu.library()
            if lin is not None:
                # the linear kernel's many-row calls (batched decode steps, also inside decoder_layers) come here
                lin.bgl_linear_set_gemm.argtypes = [_ptr, _i64]
                lin.bgl_linear_set_gemm(ctypes.cast(lib.bgl_gemm_group, _ptr), linear_handoff_rows())
    return _kernel


def linear_handoff_rows() -> int:
    """From how many rows the linear kernel's calls run on this kernel (0: none, as on AVX2 builds)."""
    k = _loaded()
    return LINEAR_HANDOFF_ROWS if k is not None and k.isa.startswith("avx512") and linear_cpu.library() else 0


def grouped_mm(problems) -> None:
    k = _loaded()
    if k is None:
        reference.grouped_mm(problems)
        return
    k(problems)
