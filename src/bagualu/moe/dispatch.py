"""Sort-based local dispatch: group the (token, k) pairs by expert so each expert sees a contiguous slice.

Legend: T tokens, D model dim, E experts, K top-k, N = T*K routed rows.

    experts_TK --flatten--> [e(0,0) e(0,1) e(1,0) ...]  --stable argsort-->  order_N
    x_sorted_ND = x_TD[order_N // K]      rows of expert 0 | rows of expert 1 | ...
                                          <-- counts_E[0] -->|<-- counts_E[1] -->|

Rejected alternative: a one-hot [E, K, T] mask with one ``where`` per expert (what ``transformers``
does): it scans all T*K routes once per expert, O(E*T*K), and launches 2E small kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dispatch:
    order_N: torch.Tensor  # routed-row index of each sorted row
    token_N: torch.Tensor  # token index of each sorted row
    counts_E: torch.Tensor  # rows per expert (int64, on device)


def make_dispatch(experts_TK: torch.Tensor, num_experts: int) -> Dispatch:
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    K = experts_TK.shape[-1]
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return Dispatch(order_N=order_N, token_N=order_N // K, counts_E=counts_E)


def permute(x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Rows of ``x`` in expert order: ``[N, D]``."""
    return x_TD.index_select(0, d.token_N)


def unpermute_combine(y_ND: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch, T: int) -> torch.Tensor:
    """Weight each expert output by its routing weight (fp32, as HF) and sum the k outputs per token."""
    w_N = weights_TK.reshape(-1).index_select(0, d.order_N)
    y_ND = (y_ND * w_N.unsqueeze(-1)).to(y_ND.dtype)
    out_TD = torch.zeros(T, y_ND.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
    return out_TD.index_add_(0, d.token_N, y_ND)
