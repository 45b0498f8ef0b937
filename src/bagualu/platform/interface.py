"""The ``Platform`` interface: everything the rest of BaGuaLu may ask about a chip.

A chip is one stateless subclass (class variables and class methods, never instances), so the current
platform is a type that can be passed around and compared with ``is``. Code outside ``platform/`` and
the kernel back-ends never branches on a device-type string; it asks the platform. A feature only one
chip has is a capability query (``supports_dtype``, ``supports_pinned_memory``), not a new method.

Nothing here probes hardware at import; every method does its work when called. Methods that touch a
device (``device_count``, ``memory_info``) are cheap queries; the two peak figures run a micro-benchmark
the first time on a host and are cached on disk afterwards (see ``figures.py``).
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from bagualu.platform import figures


class Platform:
    """One kind of accelerator (or the host CPU). Subclass and set the class variables.

    Invariants: class methods are safe to call in any order from any thread; ``is_available`` never
    raises and is False when the driver or device is missing; every other device query may assume it
    returned True. ``kernel_backends`` is read-only: subclasses assign their own dict.
    """

    name: ClassVar[str] = "abstract"
    """Registry key: ``BAGUALU_PLATFORM=<name>`` selects it; also the entry-point name of a plug-in."""
    device_type: ClassVar[str] = "cpu"
    """The ``torch.device`` type string tensors of this platform live on ("cpu", "cuda", ...)."""
    dist_backend: ClassVar[str] = "gloo"
    """``torch.distributed`` backend for this platform's process groups ("gloo", "nccl", ...)."""
    priority: ClassVar[int] = 0
    """Auto-detection preference: the available platform with the highest priority is chosen."""
    kernel_backends: ClassVar[dict[str, str]] = {}
    """Op name -> ``"pkg.mod:function"`` of this chip's kernel; missing ops use the reference ``ops``.

    Strings, not functions, so vendor code is imported only when the op is first used on this chip.
    """

    # Micro-benchmark sizes (figures.py): large enough to leave the caches, small enough to take < 1 s.
    _bench_copy_bytes: ClassVar[int] = 64 << 20
    _bench_gemm_max_n: ClassVar[int] = 2048
    # Dtypes whose GEMM FLOP/s ``describe()`` reports (those the platform supports).
    _describe_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16)

    # ---- presence and devices ------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        """Whether this process can use the platform (driver loaded, at least one device)."""
        raise NotImplementedError(f"{cls.__name__}.is_available")

    @classmethod
    def device_count(cls) -> int:
        """Devices visible to this process (1 for the host CPU, 0 when unavailable)."""
        raise NotImplementedError(f"{cls.__name__}.device_count")

    @classmethod
    def device(cls, index: int = 0) -> torch.device:
        """The ``torch.device`` of local device ``index``; raises for an index out of range."""
        count = cls.device_count()
        if not 0 <= index < count:
            raise ValueError(
                f"device index {index} is out of range for platform {cls.name!r}, which has {count} "
                f"device(s) here; use 0..{count - 1}"
            )
        return torch.device(cls.device_type, index)

    @classmethod
    def current_device(cls) -> torch.device:
        """This process's device: ``LOCAL_RANK`` (set by torchrun) modulo the device count, else 0."""
        count = max(1, cls.device_count())
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun's variable, not a BAGUALU_ one
        return cls.device(local_rank % count)

    @classmethod
    def device_name(cls, index: int = 0) -> str:
        """Human-readable model name of device ``index`` (for ``bagualu info`` and cache keys)."""
        return f"{cls.name} device {index}"

    @classmethod
    def memory_info(cls, index: int = 0) -> tuple[int, int]:
        """``(free, total)`` bytes of device ``index``'s memory, as the device reports them now."""
        raise NotImplementedError(f"{cls.__name__}.memory_info")

    # ---- memory and streams --------------------------------------------------------------------
    @classmethod
    def supports_pinned_memory(cls) -> bool:
        """Whether page-locked host buffers speed up copies to this platform's devices."""
        return False

    @classmethod
    def empty_pinned(cls, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor, page-locked when the platform supports it (plain otherwise)."""
        return torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=cls.supports_pinned_memory())

    @classmethod
    def synchronize(cls, device: torch.device | int | None = None) -> None:
        """Block until all work queued on ``device`` (default: the current one) has finished."""

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        """Whether compute (matmul, autocast) in ``dtype`` is supported, not merely storage."""
        return dtype in (torch.float32, torch.float64)

    # ---- performance figures for the cost models -----------------------------------------------
    @classmethod
    def peak_memory_bandwidth(cls) -> float:
        """Achievable device-memory bandwidth in bytes/s (a copy kernel, read + write counted).

        Measured once per host (~0.3 s) and cached on disk; table value under ``BAGUALU_NO_MEASURE``.
        """
        return figures.bandwidth(cls).value

    @classmethod
    def peak_flops(cls, dtype: torch.dtype) -> float:
        """Achievable dense GEMM FLOP/s in ``dtype``; measured once per host and dtype, then cached."""
        return figures.flops(cls, dtype).value

    @classmethod
    def _table_figures(cls) -> tuple[float, dict[str, float]]:
        """Fallback ``(bytes/s, {dtype name: FLOP/s})`` when measuring is off or impossible.

        Conservative on purpose: a plan built on it is slower than it could be, never infeasible.
        """
        return 10e9, {"float32": 10e9}

    @classmethod
    def _fingerprint_extra(cls) -> dict:
        """Extra cache-key fields (e.g. the accelerator model) beyond the host fingerprint."""
        return {}

    # ---- report ---------------------------------------------------------------------------------
    @classmethod
    def describe(cls) -> dict:
        """A JSON-able summary for ``bagualu info``; may run the micro-benchmarks (first call per host)."""
        if not cls.is_available():
            raise RuntimeError(f"platform {cls.name!r} is not available in this process")
        count = cls.device_count()
        memory = []
        for i in range(count):
            free, total = cls.memory_info(i)
            memory.append({"index": i, "free_bytes": free, "total_bytes": total})
        bw = figures.bandwidth(cls)
        gemm = {
            str(dt).removeprefix("torch."): figures.flops(cls, dt)
            for dt in cls._describe_dtypes
            if cls.supports_dtype(dt)
        }
        return {
            "name": cls.name,
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "device_type": cls.device_type,
            "device_count": count,
            "device_names": [cls.device_name(i) for i in range(count)],
            "memory": memory,
            "dist_backend": cls.dist_backend,
            "priority": cls.priority,
            "kernel_backends": dict(cls.kernel_backends),
            "peak_memory_bandwidth": {"bytes_per_s": bw.value, "source": bw.source},
            "peak_flops": {k: {"flop_per_s": f.value, "source": f.source} for k, f in gemm.items()},
            "figures_cache": str(figures.cache_file(cls)),
        }
