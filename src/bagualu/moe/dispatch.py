"""Sort-based local dispatch: group the (token, k) routes by expert so each expert sees a contiguous slice.

Legend: T tokens, D model dim, E experts, K top-k, N routes kept.

    experts_TK --flatten--> [e(0,0) e(0,1) e(1,0) ...]  --stable argsort-->  order (dropped routes last)
    x_ND = x_TD[route_N // K]             rows of expert 0 | rows of expert 1 | ...
                                          <-- kept[0] -->  |<-- kept[1] -->  |

Within an expert, routes stay in (token, choice) order — the priority used when capacity drops routes:
earlier tokens first, which is the same order however the batch is split over ranks.

Rejected alternative: a one-hot [E, K, T] mask with one ``where`` per expert (what ``transformers``
does): it scans all T*K routes once per expert, O(E*T*K), and launches 2E small kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dispatch:
    order_R: torch.Tensor  # all routes, sorted by expert; routes the router dropped (id -1) last
    counts_E: torch.Tensor  # routes per expert (int64, on device; excludes router-dropped routes)


def make_dispatch(experts_TK: torch.Tensor, num_experts: int) -> Dispatch:
    flat = experts_TK.reshape(-1)
    key = flat.masked_fill(flat < 0, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    return Dispatch(order_R=order, counts_E=counts)


def capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """Routes one expert accepts from a dispatch group of ``tokens`` tokens: ⌈factor · tokens · K / E⌉."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def first_rows(counts: list[int], kept: list[int], device) -> torch.Tensor:
    """Indices of the first ``kept[e]`` rows of each expert's segment of a ``counts``-segmented list."""
    starts, s = [], 0
    for c in counts:
        starts.append(s)
        s += c
    kept_t = torch.tensor(kept, device=device)
    n = sum(kept)
    seg_start = torch.repeat_interleave(torch.tensor(starts, device=device), kept_t, output_size=n)
    within = torch.arange(n, device=device) - torch.repeat_interleave(torch.cumsum(kept_t, 0) - kept_t, kept_t,
                                                                       output_size=n)
    return seg_start + within


def kept_routes(d: Dispatch, counts: list[int], kept: list[int]) -> torch.Tensor:
    """Route indices (into the flattened [T, K]) of the rows the experts will compute, expert-major."""
    if kept == counts:
        return d.order_R[: sum(counts)]
    return d.order_R.index_select(0, first_rows(counts, kept, d.order_R.device))


def permute(x_TD: torch.Tensor, route_N: torch.Tensor, top_k: int) -> torch.Tensor:
    return x_TD.index_select(0, route_N // top_k)


def unpermute_combine(y_ND: torch.Tensor, weights_TK: torch.Tensor, route_N: torch.Tensor, T: int) -> torch.Tensor:
    """Weight each expert output by its routing weight (fp32, as HF) and sum the outputs per token."""
    K = weights_TK.shape[-1]
    w_N = weights_TK.reshape(-1).index_select(0, route_N)
    y_ND = (y_ND * w_N.unsqueeze(-1)).to(y_ND.dtype)
    out_TD = torch.zeros(T, y_ND.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
    return out_TD.index_add_(0, route_N // K, y_ND)
