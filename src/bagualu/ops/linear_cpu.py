"""The CPU platform's fast ``linear``: ``csrc/linear_cpu.cpp`` (AVX2 or AVX-512 FMA row tiles on the helper threads).

Same semantics as ``ops.reference.linear``: ``y = x @ w.T + b`` with ``x`` fp32 ``[..., K]`` and ``w``
``[N, K]`` in fp32 or bf16 (bf16 weights are widened in registers, or with ``half_operands`` multiplied as
bf16 pairs against the rounded ``x``; accumulation is fp32; ``y`` is fp32).
Anything else — other dtypes, non-CPU tensors, inputs that need gradients — goes to the reference, so
callers may use it unconditionally. Built on first use (``ops.native``); when the build is unavailable
every call goes to the reference after one warning.
"""

from __future__ import annotations

import ctypes
import threading

import torch
import torch.nn.functional as F

from bagualu.ops import native, reference
from bagualu.ops.threads import kernel_threads

_W_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
HALF_OPERANDS = 2  # the C side's code for bf16 weights with the x rows rounded to bf16 (csrc: BF16_OPS)
PACKED_BF16 = 3  # the same products on weights laid out by pack_bf16 (csrc: BF16_PACKED)
PACKED_F32 = 4  # fp32 weights laid out by pack_f32 (csrc: F32_PACKED)
# Above this many rows the BLAS sgemm (packed panels, cache blocking over M too) is as fast or faster
# for fp32 weights (measured with benchmarks/linear.py).
MAX_ROWS_FP32 = 64
# bf16 weights (this CPU has no bf16 GEMM worth calling) come here up to this many rows; above it they are
# widened into a reused fp32 buffer for the BLAS sgemm. Measured with benchmarks/linear.py (2 threads,
# ~110M Llama shapes, a loaded box): the two are within 20% of each other from 128 to 1024 rows, either
# way; at 2048 rows (a prefill chunk) the sgemm ran 110-121 GFLOP/s against the tiles' 47-81.
MAX_ROWS_BF16 = 256
# Thread policy (measured with benchmarks/linear.py on a quiet 2-core EPYC, batch-1 decode shapes, cold
# weights): a second thread lifts a memory-bound GEMM from ~14 to ~21-26 GB/s down to 512x512 (262k
# multiply-adds), so one thread per 64k multiply-adds. Helpers join when they can and are never waited for
# (csrc/helpers.h), so on a busy machine this costs nothing. Chunks of ~64k multiply-adds: the best of
# 16k..1M for the decode shapes.
MIN_WORK_PER_THREAD = 1 << 16
CHUNK_WORK = 1 << 16
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class LinearKernel:
    def __init__(self, lib: ctypes.CDLL):
        self._run = lib.bgl_linear
        self._run.restype = None
        self._run.argtypes = [_ptr, _i64, _ptr, ctypes.c_int, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int, _i64, _i64]
        lib.bgl_linear_simd.restype = ctypes.c_int
        # which tiles this build has; "avx512-bf16" multiplies bf16 operands in hardware (half_operands)
        self.isa = ("scalar", "avx2", "avx512", "avx512-bf16")[lib.bgl_linear_simd()]
        self.amx = lib.bgl_linear_amx
        self.amx.restype = ctypes.c_int
        self.amx.argtypes = [ctypes.c_int]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                 half_operands: bool = False) -> torch.Tensor:
        """``half_operands`` (bf16 weights): round ``x`` to bf16 first, as autocast does for a bf16 GEMM."""
        # A decode step makes ~50 of these calls per token, so the Python side is kept to ~6 us: 2-D inputs
        # skip the reshape/view round trip, and the cheapest checks run first.
        if not _covered(x, w, bias):
            return reference.linear(x, w, bias, half_operands=half_operands)
        half = half_operands and w.dtype is torch.bfloat16
        if half and x.shape[:-1].numel() > MAX_ROWS_BF16:  # the rounded values, then as any fp32 input
            xr = x.to(w.dtype).float()
            return _many_rows(xr, xr.reshape(-1, x.shape[-1]), w, bias)
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M, K = x2.shape
        N = w.shape[0]
        if M > (MAX_ROWS_FP32 if w.dtype is torch.float32 else MAX_ROWS_BF16):
            return _many_rows(x, x2, w, bias)
        y = torch.empty((M, N), dtype=torch.float32)
        if M:
            self._run(x2.data_ptr(), x2.stride(0), w.data_ptr(), HALF_OPERANDS if half else _W_DTYPES[w.dtype],
                      None if bias is None else bias.data_ptr(), y.data_ptr(), N, M, N, K, kernel_threads(),
                      MIN_WORK_PER_THREAD, CHUNK_WORK)
        return y if flat else y.view(x.shape[:-1] + (N,))


def _many_rows(x: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A GEMM with more rows than the tiles are for (a prefill chunk): the platform's grouped GEMM, which reads
    a bf16 weight as stored while packing it (on an AVX-512 Zen 5: ~430 GFLOP/s from 128 rows up, against
    the BLAS sgemm's ~200); without it, the BLAS (a bf16 weight widened first)."""
    from bagualu.ops import gemm_cpu  # (it imports this module)

    if gemm_cpu._loaded() is None:
        return reference.linear(x, w, bias) if w.dtype is torch.float32 else _widened_gemm(x, w, bias)
    y = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.float32)
    if bias is not None:
        y.copy_(bias.expand_as(y))
    gemm_cpu.grouped_mm([(x2, w.t(), y, bias is not None)])
    return y if x.dim() == 2 else y.view(x.shape[:-1] + (w.shape[0],))


def _widened_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``reference.linear`` for a narrow weight at many rows, widening it into this thread's fp32 buffer
    (kept at the largest weight widened so far): a fresh copy of a large weight would be page-faulted on
    every call."""
    buf = getattr(_wide, "buf", None)
    if buf is None or buf.numel() < w.numel():
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            buf = _wide.buf = torch.empty(w.numel(), dtype=torch.float32)
    wide = buf[:w.numel()].view(w.shape)
    wide.copy_(w)
    return F.linear(x, wide, bias)


_wide = threading.local()


def _covered(x, w, bias) -> bool:
    return (x.dtype is torch.float32 and w.dtype in _W_DTYPES and x.is_cpu and w.is_cpu
            and w.dim() == 2 and x.shape[-1] == w.shape[1] and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and (bias is None or (bias.dtype is torch.float32 and bias.is_contiguous() and bias.shape == (w.shape[0],))))


class PackedWeight:
    """A weight ``[N, K]`` laid out for the packed tiles (``csrc/linear_cpu.cpp``): per 16 output columns, one
    64-byte word per step of k — bf16 (``pack_bf16``, code ``PACKED_BF16``): ``data [ceil(N/16), K/2, 16, 2]``,
    each k pair's 16 (k, k+1) weight pairs; fp32 (``pack_f32``, ``PACKED_F32``): ``data [ceil(N/16), K, 16]``.
    The columns past N are zero. ``linear_packed`` multiplies by it as ``linear`` does by the weight (bf16:
    with ``half_operands``; the sums run in another order, so results agree to rounding, not bits). It holds
    its own copy of the weights."""

    __slots__ = ("K", "N", "code", "data")

    def __init__(self, data: torch.Tensor, N: int, K: int, code: int):
        self.data, self.N, self.K, self.code = data, N, K, code

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def packed_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this CPU's build has packed tiles for weights of ``dtype``: bf16 with AVX512-BF16, fp32 with
    AVX-512."""
    k = _loaded()
    if k is None:
        return False
    return k.isa == "avx512-bf16" if dtype is torch.bfloat16 else dtype is torch.float32 and k.isa.startswith("avx512")


def amx_tiles(on: bool | None = None) -> bool:
    """Whether packed bf16 weights multiply on AMX tile units (``csrc/linear_cpu.cpp``: built for a CPU with
    AMX-BF16, the OS grants the tile state, not switched off) rather than the AVX512-BF16 tiles; ``on``
    switches it first, for the process (both compute the same products; the tests compare them)."""
    k = _loaded()
    return k is not None and bool(k.amx(-1 if on is None else int(on)))


def _pack(w: torch.Tensor, dtype: torch.dtype, code: int) -> PackedWeight:
    if not packed_available(dtype):
        raise RuntimeError(f"packed {dtype} weights need the linear kernel built for a CPU with "
                           f"{'AVX512-BF16' if dtype is torch.bfloat16 else 'AVX-512'}")
    pair = 2 if dtype is torch.bfloat16 else 1
    if w.dtype is not dtype or w.dim() != 2 or w.shape[1] % pair or w.device.type != "cpu":
        raise ValueError(f"packing takes a 2-D {dtype} CPU weight" + (" with an even number of columns" if pair == 2
                         else "") + f"; got {tuple(w.shape)} {w.dtype} on {w.device}")
    N, K = w.shape
    nb = -(-N // 16)
    padded = torch.zeros(nb * 16, K, dtype=dtype)
    padded[:N] = w
    data = padded.view(nb, 16, K // pair, pair).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(data if pair == 2 else data.view(nb, K, 16), N, K, code)


def pack_bf16(w: torch.Tensor) -> PackedWeight:
    """``w`` (bf16 ``[N, K]``, K even) in the packed tiles' layout (see ``PackedWeight``)."""
    return _pack(w, torch.bfloat16, PACKED_BF16)


def pack_f32(w: torch.Tensor) -> PackedWeight:
    """``w`` (fp32 ``[N, K]``) in the packed tiles' layout (see ``PackedWeight``)."""
    return _pack(w, torch.float32, PACKED_F32)


def linear_packed(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, W, bias)`` for the W that ``w`` packs (bf16: ``half_operands=True``): ``x`` fp32 ``[..., K]``."""
    if x.dtype is not torch.float32 or x.shape[-1] != w.K or not x.is_cpu:
        raise ValueError(f"linear_packed takes fp32 CPU rows of {w.K}; got {tuple(x.shape)} {x.dtype} on {x.device}")
    if bias is not None and (bias.dtype is not torch.float32 or bias.shape != (w.N,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous fp32 [{w.N}]; got {tuple(bias.shape)} {bias.dtype}")
    k = _loaded()
    x2 = x.reshape(-1, w.K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, w.N), dtype=torch.float32)
    if M:
        k._run(x2.data_ptr(), x2.stride(0), w.data.data_ptr(), w.code, None if bias is None else bias.data_ptr(),
               y.data_ptr(), w.N, M, w.N, w.K, kernel_threads(), MIN_WORK_PER_THREAD, CHUNK_WORK)
    return y.view(x.shape[:-1] + (w.N,))


class Gemm(ctypes.Structure):
    """One problem of ``bgl_linear_group`` (mirrors ``csrc/gemm_problem.h``): ``y = x @ w.T (+ bias)``. The
    C side (``decoder_layers_cpu.cpp``) passes an MoE layer's expert projections as one group."""

    _fields_ = [("x", _ptr), ("ldx", _i64), ("w", _ptr), ("bias", _ptr), ("y", _ptr), ("ldy", _i64), ("M", _i64),
                ("N", _i64), ("K", _i64)]


_kernel: LinearKernel | None | bool = False


def library() -> ctypes.CDLL | None:
    """The compiled library (built on first use); None when it is unavailable."""
    return native.load("linear_cpu", "linear_cpu.cpp")


def share_helpers(lib: ctypes.CDLL, adopt: str) -> None:
    """Make kernel library ``lib`` (built with ``csrc/helpers.h``) run on this library's helper threads through
    its ``adopt`` entry point: one set of helpers per process, one per core, rather than a set per library
    competing for the cores. Nothing happens when this library is unavailable."""
    lin = library()
    if lin is None:
        return
    fn = getattr(lib, adopt)
    fn.argtypes = [ctypes.c_void_p]
    lin.bgl_helpers_pool.restype = ctypes.c_void_p
    fn(lin.bgl_helpers_pool())


def _loaded() -> LinearKernel | None:
    global _kernel
    if _kernel is False:
        lib = library()
        _kernel = LinearKernel(lib) if lib is not None else None
    return _kernel


def linear(x: torch.Tensor, w: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None, *,
           half_operands: bool = False) -> torch.Tensor:
    if isinstance(w, PackedWeight):  # made by pack_weight (ops.registry.linear_packer)
        if w.code == PACKED_BF16 and not half_operands:
            raise ValueError("packed bf16 weights multiply bf16-rounded inputs: call with half_operands=True")
        return linear_packed(x, w, bias)
    k = _loaded()
    if k is None:
        return reference.linear(x, w, bias, half_operands=half_operands)
    return k(x, w, bias, half_operands=half_operands)


def _native_weight_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(_W_DTYPES) if _loaded() is not None else (torch.float32,)


# what ops.registry.linear_weight_dtypes reports for this kernel: bf16 weights are read as they are stored
linear.native_weight_dtypes = _native_weight_dtypes


def _pack_weight(w: torch.Tensor, half_operands: bool) -> PackedWeight | None:
    """``w`` repacked for the packed tiles where this CPU has them and ``w`` suits them (bf16 with half operands,
    K even; fp32); else None."""
    if w.dim() != 2:
        return None
    if w.dtype is torch.bfloat16 and half_operands and w.shape[1] % 2 == 0 and packed_available(torch.bfloat16):
        return pack_bf16(w)
    if w.dtype is torch.float32 and packed_available(torch.float32):
        return pack_f32(w)
    return None


# what ops.registry.linear_packer reports: weights repacked once for this linear, passed as ``w``
linear.pack_weight = _pack_weight


def _fp32_on_own_threads() -> bool:
    """Whether every fp32 call, whatever its rows, runs on this library's helper threads (the row tiles, and
    the grouped GEMM for many rows) rather than torch's OpenMP team."""
    from bagualu.ops import gemm_cpu  # (it imports this module)

    return _loaded() is not None and gemm_cpu._loaded() is not None


# what ops.registry.linear_fp32_on_own_threads reports
linear.fp32_on_own_threads = _fp32_on_own_threads


def _half_operand_dtypes() -> tuple[torch.dtype, ...]:
    k = _loaded()
    return (torch.bfloat16,) if k is not None and k.isa == "avx512-bf16" else ()


# what ops.registry.linear_half_operand_dtypes reports: bf16 products in hardware (csrc: BF16_OPS)
linear.half_operand_dtypes = _half_operand_dtypes


def _matrix_unit_dtypes() -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if amx_tiles() else ()


# what ops.registry.linear_matrix_unit_dtypes reports: packed bf16 weights multiplied on AMX tiles
linear.matrix_unit_dtypes = _matrix_unit_dtypes
