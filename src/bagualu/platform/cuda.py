"""NVIDIA GPUs through ``torch.cuda``: NCCL for collectives, pinned host memory, measured or tabled peaks.

Importing this module never touches the driver; ``is_available`` is the first call that does, and it
is False on a CPU-only build of torch and on ROCm builds (which reuse the ``torch.cuda`` namespace but
belong to a ROCm platform). ``torch.cuda.device_count`` asks NVML and does not create a CUDA context.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bagualu.platform.interface import Platform

# (substrings that must all occur in the device name, copy bytes/s, dense GEMM FLOP/s per dtype).
# Datasheet numbers; first match wins, so more specific names come first. fp32 is without TF32.
_KNOWN_GPUS: list[tuple[tuple[str, ...], float, dict[str, float]]] = [
    (("H200",), 4.8e12, {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    (("H100", "PCIe"), 2.0e12, {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    (("H100",), 3.35e12, {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    (("A100", "80GB"), 2.0e12, {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    (("A100",), 1.555e12, {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    (("L40S",), 0.864e12, {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12}),
]
# An unknown GPU: low enough that a plan made with it still fits.
_UNKNOWN_GPU: tuple[float, dict[str, float]] = (0.5e12, {"bfloat16": 50e12, "float16": 50e12, "float32": 10e12})


def table_figures_for(device_name: str) -> tuple[float, dict[str, float]]:
    """Datasheet ``(bytes/s, {dtype: FLOP/s})`` for a GPU model name, conservative when unknown."""
    for needles, bw, flops in _KNOWN_GPUS:
        if all(n in device_name for n in needles):
            return bw, dict(flops)
    return _UNKNOWN_GPU[0], dict(_UNKNOWN_GPU[1])


class CudaPlatform(Platform):
    """NVIDIA GPUs; local rank ``r`` uses GPU ``r % device_count``."""

    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    dist_backend: ClassVar[str] = "nccl"
    priority: ClassVar[int] = 100
    kernel_backends: ClassVar[dict[str, str]] = {
        "compiler_codegen": "bagualu.compiler.codegen.gpu:TritonCodegen",
    }
    _bench_copy_bytes: ClassVar[int] = 512 << 20  # 1 GiB moved per copy: far beyond L2, ~0.3 ms
    _bench_gemm_max_n: ClassVar[int] = 8192

    @classmethod
    def is_available(cls) -> bool:
        try:
            return torch.version.hip is None and torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - a broken driver means "not available", never a crash
            return False

    @classmethod
    def device_count(cls) -> int:
        return torch.cuda.device_count() if cls.is_available() else 0

    @classmethod
    def device_name(cls, index: int = 0) -> str:
        return torch.cuda.get_device_name(cls.device(index))

    @classmethod
    def memory_info(cls, index: int = 0) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(cls.device(index))
        return int(free), int(total)

    @classmethod
    def supports_pinned_memory(cls) -> bool:
        return cls.is_available()

    @classmethod
    def synchronize(cls, device: torch.device | int | None = None) -> None:
        torch.cuda.synchronize(cls.current_device() if device is None else device)

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        if dtype in (torch.float32, torch.float64, torch.float16):
            return True
        if not cls.is_available():
            return False
        cc = torch.cuda.get_device_capability(cls.current_device())
        if dtype == torch.bfloat16:
            return cc >= (8, 0)
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return cc >= (8, 9)
        return False

    @classmethod
    def _table_figures(cls) -> tuple[float, dict[str, float]]:
        name = cls.device_name(cls.current_device().index or 0) if cls.is_available() else ""
        return table_figures_for(name)

    @classmethod
    def _fingerprint_extra(cls) -> dict:
        names = [cls.device_name(i) for i in range(cls.device_count())]
        return {"gpus": names, "cuda": torch.version.cuda}
