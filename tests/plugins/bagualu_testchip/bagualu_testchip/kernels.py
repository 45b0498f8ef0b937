"""The test chip's RMSNorm: numerically the reference, but it leaves a trace that it ran.

``calls`` counts calls in this process; if ``BAGUALU_TESTCHIP_TRACE`` names a file (a variable of this
plug-in, not of bagualu), each call also appends one line to it so a parent process can check.
"""

from __future__ import annotations

import os

import torch

calls = 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    global calls
    calls += 1
    trace = os.environ.get("BAGUALU_TESTCHIP_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(f"rms_norm {tuple(x.shape)} {x.dtype}\n")
    input_dtype = x.dtype
    x = x.float()
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return weight * x.to(input_dtype)
