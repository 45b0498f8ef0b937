"""RMSNorm: the one normalisation of the decoder family (layers, MLA's latent norms, the final norm).

Its own file so both ``layers.py`` and ``mla.py`` use it without importing each other.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagualu.ops import kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel("rms_norm")(x, self.weight, self.eps)
