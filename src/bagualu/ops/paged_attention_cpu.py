"""The CPU platform's fast ``paged_attention``: a C++ kernel (``csrc/paged_attention_cpu.cpp``) via ctypes.

Same signature and semantics as ``ops.paged_kv.paged_attention`` (the reference). The library is built on
the first call, not at import (``ops.native``); when it cannot be built or ``BAGUALU_NO_NATIVE`` is set,
calls go to the reference after one warning. Inputs the kernel does not cover (fp16, tensors on another
device) also go to the reference, silently: that is a supported configuration, not a failure.

Before passing raw pointers this module checks everything the C++ side relies on: dtypes, shapes and
strides here, and the index tensors' values (query_start_loc, context_lens, block ids) in one C pass that
reports the first bad value, so a wrong block table raises a ValueError instead of reading stray memory.
The thread count is ``ops.threads.kernel_threads()`` (torch's, unless inside ``small_step``). The threads are
the linear kernel's helper pool (``csrc/helpers.h``), adopted when both libraries load, not an OpenMP team:
an OpenMP worker spins for milliseconds after each region without yielding, and on a 2-core box it took a
core from the linear kernel's helper between the step's GEMMs (measured: a Mixtral batch-32 decode step
~22% faster with OMP_WAIT_POLICY=passive; this removes the cause).

Legend: N blocks, G KV heads, B block size, Dh head dim, T query tokens, H query heads, S sequences,
M max blocks per sequence.
"""

from __future__ import annotations

import ctypes

import torch

from bagualu.ops import linear_cpu, native, paged_kv
from bagualu.ops.threads import kernel_threads

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class PagedAttentionKernel:
    """ctypes front of one build of the kernel library (the tests also build a scalar-only variant)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self._run = lib.bgl_paged_attention
        self._run.restype = ctypes.c_int
        self._run.argtypes = [_ptr, _ptr, _ptr, _ptr, ctypes.c_int, ctypes.c_int, _i64, _i64, _i64, _i64, _i64, _i64,
                              _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, ctypes.c_float, _i64, ctypes.c_int, _ptr]
        lib.bgl_simd_width.restype = ctypes.c_int
        self.simd_width = lib.bgl_simd_width()
        lib.bgl_prefill_tiles.restype = ctypes.c_int
        # whether prefill chunks (>= 4 query rows of a sequence) run on the prefill tiles (csrc/paged_attention_tiles.h;
        # AVX-512 builds, head dims and block sizes that are multiples of 16)
        self.prefill_tiles = bool(lib.bgl_prefill_tiles())

    def covers(self, q_THDh: torch.Tensor, k_cache_NGBDh: torch.Tensor) -> bool:
        return (q_THDh.dtype in _DTYPE_CODES and k_cache_NGBDh.dtype in _DTYPE_CODES
                and q_THDh.device.type == "cpu" and k_cache_NGBDh.device.type == "cpu")

    def __call__(self, q_THDh, k_cache_NGBDh, v_cache_NGBDh, block_tables_SM, context_lens_S, query_start_loc_S1,
                 scale, window=None, *, out=None):
        paged_kv.check_paged_inputs(q_THDh, k_cache_NGBDh, v_cache_NGBDh, block_tables_SM, context_lens_S,
                                    query_start_loc_S1, window, out)
        N, G, B, Dh = k_cache_NGBDh.shape
        T, H, _ = q_THDh.shape
        S, M = block_tables_SM.shape
        if q_THDh.stride(2) != 1 or q_THDh.stride(1) != Dh:
            q_THDh = q_THDh.contiguous()  # a [T, H*Dh] view with any token stride is taken as is
        if out is None:
            out = torch.empty(T, H, Dh, dtype=q_THDh.dtype)
        elif out.stride(2) != 1 or out.stride(1) != Dh:
            raise ValueError(f"out must have unit feature stride and head stride head_dim={Dh}; got strides "
                             f"{out.stride()} (pass a contiguous buffer)")
        bt, cl, qsl = block_tables_SM.contiguous(), context_lens_S.contiguous(), query_start_loc_S1.contiguous()
        err = (_i64 * 3)()
        # The kernel checks the index tensors' values before it reads the cache (code != 0: nothing written).
        code = self._run(q_THDh.data_ptr(), k_cache_NGBDh.data_ptr(), v_cache_NGBDh.data_ptr(), out.data_ptr(),
                         _DTYPE_CODES[q_THDh.dtype], _DTYPE_CODES[k_cache_NGBDh.dtype], q_THDh.stride(0),
                         out.stride(0), T, S, H, G, Dh, N, B, M, bt.data_ptr(), cl.data_ptr(), qsl.data_ptr(),
                         scale, 0 if window is None else window, kernel_threads(), err)
        if code:
            raise ValueError(index_error_message(code, list(err), T, M, N))
        return out


def index_error_message(code: int, err: list[int], T: int, M: int, N: int) -> str:
    s, a, b = err
    return {
        1: f"query_start_loc[0] must be 0; got {s}",
        2: f"sequence {s} has {a} query rows (query_start_loc must increase by >= 1 per sequence)",
        3: f"query_start_loc[-1]={s} must equal the number of query rows T={T}",
        4: f"sequence {s}: {a} query rows exceed its context_len {b}; write the new tokens' KV first and "
           f"count them in context_lens",
        5: f"sequence {s}: context_len needs {a} blocks but block_tables has {M} columns; widen block_tables",
        6: f"sequence {s}: block_tables[{s}, {a}] = {b} is not a block of the cache (0..{N - 1})",
    }[code]


def kernel() -> PagedAttentionKernel | None:
    """The compiled kernel, built on first use; None (after one warning) when it is unavailable."""
    lib = native.load("paged_attention_cpu", "paged_attention_cpu.cpp")
    if lib is None:
        return None
    if not hasattr(lib, "_bgl_kernel"):
        linear_cpu.share_helpers(lib, "bgl_adopt_helpers")  # one set of helper threads for a step's kernels
        lib._bgl_kernel = PagedAttentionKernel(lib)
    return lib._bgl_kernel


def paged_attention(q_THDh: torch.Tensor, k_cache_NGBDh: torch.Tensor, v_cache_NGBDh: torch.Tensor,
                    block_tables_SM: torch.Tensor, context_lens_S: torch.Tensor, query_start_loc_S1: torch.Tensor,
                    scale: float, window: int | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.paged_kv.paged_attention`` computed by the C++ kernel where it can be, else by the reference."""
    k = kernel()
    if k is None or not k.covers(q_THDh, k_cache_NGBDh):
        return paged_kv.paged_attention(q_THDh, k_cache_NGBDh, v_cache_NGBDh, block_tables_SM, context_lens_S,
                                        query_start_loc_S1, scale, window, out=out)
    return k(q_THDh, k_cache_NGBDh, v_cache_NGBDh, block_tables_SM, context_lens_S, query_start_loc_S1, scale,
             window, out=out)
