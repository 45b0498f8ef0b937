"""``TestChipPlatform``: the host CPU renamed, with one kernel back-end declared by dotted path."""

from __future__ import annotations

from typing import ClassVar

from bagualu.platform.cpu import CpuPlatform


class TestChipPlatform(CpuPlatform):
    """Never auto-selected (priority below cpu); only ``BAGUALU_PLATFORM=testchip`` picks it."""

    __test__ = False  # not a pytest test class despite the name

    name: ClassVar[str] = "testchip"
    priority: ClassVar[int] = -10
    kernel_backends: ClassVar[dict[str, str]] = {"rms_norm": "bagualu_testchip.kernels:rms_norm"}
