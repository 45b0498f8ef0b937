"""Counter-based random numbers for routers: noise as a pure function of (seed, global token, expert).

Why not ``torch.rand``: under expert/data parallelism each rank routes its own slice of the batch, and
the stateful generator would give a token different noise than a single process routing the
concatenated batch. Keyed on the token's global index, the noise — and so the routing — is identical
however the batch is split. splitmix64 finalisation on int64 (wrapping multiply; the logical shifts
are arithmetic shifts masked to their width).
"""

from __future__ import annotations

import torch

_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_GOLD = -7046029254386353131  # 0x9E3779B97F4A7C15


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniform(seed: int, token_T: torch.Tensor, width: int, stream: int = 0) -> torch.Tensor:
    """fp32 uniforms in [0, 1), shape ``[T, width]``, for global token indices ``token_T``."""
    col = torch.arange(width, device=token_T.device, dtype=torch.int64)
    key = (token_T.to(torch.int64)[:, None] * width + col) * 4 + stream
    x = _mix(key * _GOLD + _mix(torch.tensor(seed, dtype=torch.int64, device=token_T.device) + _GOLD))
    return _shr(x, 40).to(torch.float32) * (1.0 / (1 << 24))


def normal(seed: int, token_T: torch.Tensor, width: int) -> torch.Tensor:
    """Standard normals (Box–Muller over two uniform streams)."""
    u1 = uniform(seed, token_T, width, stream=1).clamp_min(1e-7)
    u2 = uniform(seed, token_T, width, stream=2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)
