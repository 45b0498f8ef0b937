"""The compiler's code generators as a pytest parameter: C always, Triton when it is installed.

Triton's runs go through its interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by ``conftest`` on
machines without a GPU); ``triton_device()`` says where a Triton kernel's inputs must live.
"""

from __future__ import annotations

import os

import pytest

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

CODEGENS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed"))]


def device_for(codegen: str) -> str:
    """``cuda`` for Triton on a machine that runs it for real, else ``cpu``."""
    return "cuda" if codegen == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
