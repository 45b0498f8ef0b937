"""Resolve an operator to the current platform's kernel, or to the reference.

A platform names its kernels by dotted path (``Platform.kernel_backends``) so vendor code is imported
only when that platform is chosen. Resolution happens on first use and is cached per (platform, op);
a kernel that fails to import falls back to the reference with a warning, never an exception, so a
model always runs.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from bagualu.ops import decoder_layers, paged_kv, reference
from bagualu.utils.lazy import import_dotted
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

_REFERENCE: dict[str, Callable] = {
    "rms_norm": reference.rms_norm,
    "linear": reference.linear,
    "grouped_mm": reference.grouped_mm,
    "silu_mul": reference.silu_mul,
    "silu_mul_backward": reference.silu_mul_backward,
    "scale_rows": reference.scale_rows,
    "row_dot": reference.row_dot,
    "index_add_rows": reference.index_add_rows,
    "apply_rope": reference.apply_rope,
    "apply_rope_interleaved": reference.apply_rope_interleaved,
    "apply_rope_complex": reference.apply_rope_complex,
    "attention": reference.attention,
    "write_kv": paged_kv.write_kv,
    "paged_attention": paged_kv.paged_attention,
    "decoder_layers": decoder_layers.decoder_layers,
    "decoder_layer_halves": decoder_layers.decoder_layer_halves,
    "argmax_rows": reference.argmax_rows,
}


def reference_names() -> list[str]:
    return sorted(_REFERENCE)


@functools.cache
def _resolve(platform_name: str, op: str) -> Callable:
    from bagualu.platform import get_platform

    path = get_platform(platform_name).kernel_backends.get(op)
    if path is None:
        return _REFERENCE[op]
    try:
        fn = import_dotted(path)
    except Exception as e:  # a broken vendor kernel must not break the model
        log.warning("kernel %r for op %r on platform %r failed to load (%s); using the reference", path, op,
                    platform_name, e)
        return _REFERENCE[op]
    log.debug("op %r -> %s (platform %s)", op, path, platform_name)
    return fn


def serving_path() -> bool:
    """True where model code may take its inference-only fast paths (under ``torch.inference_mode``), False
    while ``torch.compile`` traces it: the compiler traces the training path's torch ops instead, and
    ``torch.is_inference_mode_enabled`` would be a graph break."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def kernel(op: str, platform: str | None = None) -> Callable:
    """The callable for ``op`` on ``platform`` (default: the current one); same signature as the reference.

    ``platform`` names where the data is, when that is not the current platform's device: the serving
    engine's R-workers attend over KV caches in host memory on a GPU machine, so they ask for ``"cpu"``.
    """
    if op not in _REFERENCE:
        raise KeyError(f"unknown op {op!r}; known ops: {reference_names()}")
    if torch.compiler.is_compiling():
        # under torch.compile the compiler makes the kernels: it traces the reference's torch ops (a
        # platform kernel is opaque to it — a ctypes call or a host-side check is a graph break)
        return _REFERENCE[op]
    if platform is None:
        from bagualu.platform import current_platform

        platform = current_platform().name
    return _resolve(platform, op)


def linear_weight_dtypes(platform: str | None = None) -> tuple[torch.dtype, ...]:
    """Weight dtypes the platform's ``linear`` reads as stored, with fp32 activations and no widened copy per
    call (a capability query: the kernel says so by a ``native_weight_dtypes`` attribute). Weights kept in
    a narrower one halve what a memory-bound decode step reads; any other is widened by the reference."""
    query = getattr(kernel("linear", platform), "native_weight_dtypes", None)
    return tuple(query()) if query is not None else (torch.float32,)


def linear_half_operand_dtypes(platform: str | None = None) -> tuple[torch.dtype, ...]:
    """Weight dtypes whose products the platform's ``linear`` and layer operator multiply natively when their
    inputs are rounded to them (``half_operands``; bf16 on CPUs with AVX512-BF16): there a half GEMM of a
    few rows runs at the half rate without the framework's per-op overhead. A ``half_operand_dtypes``
    attribute of the platform's ``linear`` says so; none otherwise."""
    query = getattr(kernel("linear", platform), "half_operand_dtypes", None)
    return tuple(query()) if query is not None else ()


def linear_matrix_unit_dtypes(platform: str | None = None) -> tuple[torch.dtype, ...]:
    """Weight dtypes whose half-operand products the platform's ``linear`` runs on a matrix unit on repacked
    weights (bf16 on CPUs with AMX): there a repacked weight is read at the memory's rate from one row up, so
    a step of any size gains from half operands on the packed copies. A ``matrix_unit_dtypes`` attribute of
    the platform's ``linear`` says so; none otherwise."""
    query = getattr(kernel("linear", platform), "matrix_unit_dtypes", None)
    return tuple(query()) if query is not None else ()


def linear_packer(platform: str | None = None) -> Callable | None:
    """The platform's repacking of a weight for its ``linear``: a callable ``(weight, half_operands)`` returning
    what ``linear`` then takes as ``w`` (with the same ``half_operands``), or None for a weight it does not
    repack; None where the platform has no such layout (on CPU: ``linear_cpu.pack_bf16`` with AVX512-BF16,
    ``pack_f32`` with AVX-512). A ``pack_weight`` attribute of the platform's ``linear`` says so."""
    return getattr(kernel("linear", platform), "pack_weight", None)


def linear_fp32_on_own_threads(platform: str | None = None) -> bool:
    """Whether the platform's ``linear`` runs fp32 GEMMs of any size on threads of its own, not torch's (a
    ``fp32_on_own_threads`` attribute says so): then a step made of the platform's kernels gains nothing from
    torch's OpenMP team for its few element-wise ops, and the team's spinning workers take the cores the
    kernels' threads need."""
    query = getattr(kernel("linear", platform), "fp32_on_own_threads", None)
    return bool(query()) if query is not None else False
