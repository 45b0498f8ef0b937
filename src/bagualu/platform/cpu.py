"""The host CPU as a platform: always available, lowest built-in priority, gloo for collectives.

It is the reference every other platform is compared with, so most of its kernels are the ``ops``
reference functions; it names a C++ kernel only where the reference is too slow to serve with (paged-KV
decode attention, built on first use, else the reference). Memory figures come from ``/proc/meminfo``
capped by a cgroup-v2 limit when the process runs in a container with one (what a planner can really use).
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from bagualu.platform import figures
from bagualu.platform.interface import Platform


def _meminfo() -> tuple[int, int] | None:
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024  # values are in kB
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _cgroup_limit() -> tuple[int, int] | None:
    """``(limit - usage, limit)`` of the cgroup-v2 memory controller, if a limit is set."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        limit = int(raw)
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        return max(0, limit - used), limit
    except (OSError, ValueError):
        return None


def host_memory() -> tuple[int, int]:
    """``(free, total)`` bytes of host memory usable by this process."""
    info = _meminfo()
    if info is None:  # not Linux: POSIX sysconf, available pages where the OS reports them
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            free = total
        info = (free, total)
    cg = _cgroup_limit()
    if cg is not None:
        info = (min(info[0], cg[0]), min(info[1], cg[1]))
    return info


class CpuPlatform(Platform):
    """The host CPU; one "device" whatever the core count (threads are torch's business)."""

    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    priority: ClassVar[int] = 0
    kernel_backends: ClassVar[dict[str, str]] = {
        "paged_attention": "bagualu.ops.paged_attention_cpu:paged_attention",
        "linear": "bagualu.ops.linear_cpu:linear",
        "grouped_mm": "bagualu.ops.gemm_cpu:grouped_mm",
        "silu_mul": "bagualu.ops.elementwise_cpu:silu_mul",
        "silu_mul_backward": "bagualu.ops.elementwise_cpu:silu_mul_backward",
        "scale_rows": "bagualu.ops.elementwise_cpu:scale_rows",
        "row_dot": "bagualu.ops.elementwise_cpu:row_dot",
        "index_add_rows": "bagualu.ops.elementwise_cpu:index_add_rows",
        "rms_norm": "bagualu.ops.decode_ops_cpu:rms_norm",
        "apply_rope": "bagualu.ops.decode_ops_cpu:apply_rope",
        "write_kv": "bagualu.ops.decode_ops_cpu:write_kv",
        "argmax_rows": "bagualu.ops.decode_ops_cpu:argmax_rows",
        "decoder_layers": "bagualu.ops.decoder_layers_cpu:decoder_layers",
        "decoder_layer_halves": "bagualu.ops.decoder_layers_cpu:decoder_layer_halves",
        "compiler_codegen": "bagualu.compiler.codegen.cpu:CppCodegen",
    }

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def device_count(cls) -> int:
        return 1

    @classmethod
    def device(cls, index: int = 0) -> torch.device:
        """Always ``torch.device("cpu")`` (no index: ``cpu:0`` would compare unequal to ``cpu``)."""
        super().device(index)  # range check only
        return torch.device("cpu")

    @classmethod
    def device_name(cls, index: int = 0) -> str:
        return f"{figures.cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"

    @classmethod
    def memory_info(cls, index: int = 0) -> tuple[int, int]:
        cls.device(index)
        return host_memory()

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        # CPU autocast and matmul accept bf16 and fp16 (fp16 GEMM may be slow without fp16 units:
        # the measured peak_flops tells the cost model how slow).
        return dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    @classmethod
    def _table_figures(cls) -> tuple[float, dict[str, float]]:
        # A few-core laptop: 10 GB/s copy, ~50 GFLOP/s fp32. Conservative by design.
        return 10e9, {"float32": 50e9, "float64": 25e9, "bfloat16": 50e9, "float16": 5e9}
