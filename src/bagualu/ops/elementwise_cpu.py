"""The CPU platform's ``silu_mul``, ``silu_mul_backward``, ``scale_rows``, ``row_dot`` and ``index_add_rows``:
one C pass each (``csrc/elementwise_cpu.cpp``) on the caller and the kernels' helper threads.

Same signatures and semantics as ``ops.reference``, except that each value is computed in fp32 and rounded
once to the output dtype (the reference rounds bf16 intermediates: silu(g) before the product, da·u before
silu's derivative, dy·y before the row sum) and exp is a polynomial within 2 ulp of libm's; ``scale_rows``
and ``index_add_rows`` equal the reference bit for bit. Covered:
contiguous CPU tensors of one dtype, fp32 or bf16 (routing weights fp32), an output that is either a fresh
tensor or given (``out=``, which may be an input itself, never a partial overlap), and no autograd to record;
also ``silu_mul`` of row-strided operands into a fresh output (the halves of a fused gate/up projection: a
prefill's SwiGLU) — anything else goes to the reference. Built on first use (``ops.native``); when the build
is unavailable the reference runs.

Why: the MoE experts' training passes (``moe.experts``, ``moe.local``) over [N, F] and [N, D] tensors ran as
separate ATen passes — two for silu(g)·u forward, five for its backward — and a bf16 tensor times an fp32
column of routing weights went through an fp32 copy of the whole tensor (6 ms against 0.9 ms for a
same-dtype product, 24576 x 512 here).
"""

from __future__ import annotations

import ctypes

import torch

from bagualu.ops import linear_cpu, native, reference
from bagualu.ops.threads import kernel_threads

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_CODES = {torch.float32: 0, torch.bfloat16: 1}
_lib: ctypes.CDLL | None | bool = False


def library() -> ctypes.CDLL | None:
    """The compiled library with its signatures declared; None when it is unavailable (built on first use)."""
    global _lib
    if _lib is False:
        lib = native.load("elementwise_cpu", "elementwise_cpu.cpp", ("-ffp-contract=off",))
        if lib is not None:
            lib.bgl_silu_mul.restype = None
            lib.bgl_silu_mul.argtypes = [_ptr, _ptr, _ptr, _i64, _int, _int]
            lib.bgl_silu_mul_rows.restype = None
            lib.bgl_silu_mul_rows.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _int, _int]
            lib.bgl_silu_mul_backward.restype = None
            lib.bgl_silu_mul_backward.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _int, _int]
            lib.bgl_scale_rows.restype = None
            lib.bgl_scale_rows.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _int, _int]
            lib.bgl_row_dot.restype = None
            lib.bgl_row_dot.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _int, _int]
            lib.bgl_index_add_rows.restype = _int
            lib.bgl_index_add_rows.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _int, _int]
            linear_cpu.share_helpers(lib, "bgl_elementwise_adopt_helpers")
        _lib = lib
    return _lib


def _covered(*ts: torch.Tensor | None, contiguous: bool = True) -> bool:
    """Contiguous (unless ``contiguous=False``) CPU tensors of one covered dtype and shape (None: an output to
    allocate), nothing for autograd."""
    first = ts[0]
    if first.dtype not in _CODES:
        return False
    grad = torch.is_grad_enabled()
    for t in ts:
        if t is None:
            continue
        if (t.device.type != "cpu" or t.dtype != first.dtype or t.shape != first.shape
                or (contiguous and not t.is_contiguous()) or (grad and t.requires_grad)):
            return False
    return True


def _overlap_free(outs, ins) -> bool:
    """Each output is a distinct tensor that is an input itself or shares no memory with any input."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in ins]
    seen = set()
    for o in outs:
        if o is None:
            continue
        lo, hi = o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()
        if lo in seen:
            return False
        seen.add(lo)
        for a, b in spans:
            if (a, b) != (lo, hi) and a < hi and lo < b:
                return False
    return True


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    lib = library()
    if lib is None:
        return reference.silu_mul(gate, up, out=out)
    if not _covered(gate, up, out):
        return _silu_mul_rows(lib, gate, up, out)
    if not _overlap_free([out], [gate, up]):
        return reference.silu_mul(gate, up, out=out)
    out = torch.empty_like(gate) if out is None else out
    lib.bgl_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), _CODES[gate.dtype], kernel_threads())
    return out


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as ``[rows, d]`` with unit stride along d (its last dim), or None where no view is."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _silu_mul_rows(lib, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``silu_mul`` over operands that are rows with strides — the two halves of a fused gate/up projection's
    output, ``chunk(2, -1)`` — in one pass (the reference would run two). Into a fresh contiguous output only."""
    g, u = _rows(gate), _rows(up)
    if out is not None or g is None or u is None or not _covered(gate, up, contiguous=False):
        return reference.silu_mul(gate, up, out=out)
    a = torch.empty(gate.shape, dtype=gate.dtype)
    rows, d = g.shape
    if a.numel():
        lib.bgl_silu_mul_rows(g.data_ptr(), u.data_ptr(), a.data_ptr(), rows, d, g.stride(0), u.stride(0), d,
                              _CODES[gate.dtype], kernel_threads())
    return a


def silu_mul_backward(da: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, du_out: torch.Tensor | None = None,
                      dg_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    lib = library()
    if (lib is None or not _covered(da, gate, up, du_out, dg_out)
            or not _overlap_free([du_out, dg_out], [da, gate, up])):
        return reference.silu_mul_backward(da, gate, up, du_out=du_out, dg_out=dg_out)
    du = torch.empty_like(da) if du_out is None else du_out
    dg = torch.empty_like(da) if dg_out is None else dg_out
    lib.bgl_silu_mul_backward(da.data_ptr(), gate.data_ptr(), up.data_ptr(), du.data_ptr(), dg.data_ptr(), da.numel(),
                              _CODES[da.dtype], kernel_threads())
    return du, dg


def _rows_covered(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dim() == 2 and w.dim() == 1 and w.shape[0] == x.shape[0] and w.dtype is torch.float32
            and w.device.type == "cpu" and w.is_contiguous() and not (torch.is_grad_enabled() and w.requires_grad))


def scale_rows(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    lib = library()
    if lib is None or not _covered(x, out) or not _rows_covered(x, w) or not _overlap_free([out], [x, w]):
        return reference.scale_rows(x, w, out=out)
    out = torch.empty_like(x) if out is None else out
    lib.bgl_scale_rows(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], _CODES[x.dtype],
                       kernel_threads())
    return out


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lib = library()
    if lib is None or a.dim() != 2 or not _covered(a, b):
        return reference.row_dot(a, b)
    out = torch.empty(a.shape[0], dtype=torch.float32)
    lib.bgl_row_dot(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.shape[0], a.shape[1], _CODES[a.dtype],
                    kernel_threads())
    return out


def index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor,
                   w: torch.Tensor | None = None) -> torch.Tensor:
    lib = library()
    if (lib is None or out.dim() != 2 or src.dim() != 2 or out.shape[1] != src.shape[1] or not _covered(out)
            or not _covered(src) or src.dtype != out.dtype or index.dtype is not torch.int64 or index.dim() != 1
            or index.shape[0] != src.shape[0] or not index.is_contiguous() or index.device.type != "cpu"
            or (w is not None and not _rows_covered(src, w)) or not _overlap_free([out], [src])
            or (out.data_ptr() == src.data_ptr() and out.numel() > 0)):
        return reference.index_add_rows(out, index, src, w)
    if lib.bgl_index_add_rows(out.data_ptr(), out.shape[0], index.data_ptr(), src.data_ptr(),
                              None if w is None else w.data_ptr(), src.shape[0], src.shape[1], _CODES[out.dtype],
                              kernel_threads()):
        raise IndexError(f"index_add_rows: an index is out of range for {out.shape[0]} rows "
                         f"(min {int(index.min())}, max {int(index.max())})")
    return out
