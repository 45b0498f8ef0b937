"""Paged KV cache: the layout, input checks, and the reference ``write_kv`` / ``paged_attention``.

The serving engine keeps each layer's keys and values in fixed-size blocks so sequences grow without
copying and share prompt blocks. One layer's cache is two contiguous tensors::

    k_cache_NGBDh[block, kv_head, offset, :]      N blocks, G KV heads, B = block_size slots, Dh features

    sequence s, key position j  ->  block_tables_SM[s, j // B], offset j % B
    slot = block * B + offset   (what ``write_kv`` takes per token)

KV head first within a block (``[G, B, Dh]`` rather than ``[B, G, Dh]``) so the keys one head needs from a
block are one contiguous ``B * Dh`` run: the decode kernel streams it with no stride.

A batch is "varlen": ``query_start_loc_S1`` cuts the query rows into sequences (n_s >= 1 rows each); the
rows of sequence s are the *last* n_s positions of its ``context_lens_S[s]`` keys, already written. Query i
sits at p = context_lens[s] - n_s + i and sees keys j <= p (and j > p - window with a sliding window, as
Mistral/Mixtral: itself and window-1 before it). Decode is n_s = 1; chunked prefill is n_s > 1.

These functions are the specification the fast kernels are tested against: they gather each sequence's
keys into a contiguous tensor and call ``ops.reference.attention`` in fp32. Their host syncs (``.tolist()``)
are deliberate: a reference favours plainness over speed.

Legend: N blocks, G KV heads, B block size, Dh head dim, T query tokens, H query heads, S sequences,
M max blocks per sequence.
"""

from __future__ import annotations

import torch

from bagualu.ops.reference import attention

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_cache(k_cache_NGBDh: torch.Tensor, v_cache_NGBDh: torch.Tensor) -> None:
    """Both caches ``[N, G, B, Dh]``, same shape, dtype and device, contiguous."""
    if k_cache_NGBDh.dim() != 4 or k_cache_NGBDh.shape != v_cache_NGBDh.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, kv_heads, block_size, head_dim]; got "
                         f"{tuple(k_cache_NGBDh.shape)} and {tuple(v_cache_NGBDh.shape)}")
    if k_cache_NGBDh.dtype != v_cache_NGBDh.dtype or k_cache_NGBDh.dtype not in KV_DTYPES:
        raise TypeError(f"k_cache/v_cache dtypes {k_cache_NGBDh.dtype}/{v_cache_NGBDh.dtype} must be equal and one "
                        f"of {KV_DTYPES}")
    if not (k_cache_NGBDh.is_contiguous() and v_cache_NGBDh.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (allocate them with torch.empty/zeros, not a view)")


def check_paged_inputs(q_THDh, k_cache_NGBDh, v_cache_NGBDh, block_tables_SM, context_lens_S, query_start_loc_S1,
                       window, out) -> None:
    """Shape/dtype checks shared by the reference and the fast kernels (no host sync)."""
    check_cache(k_cache_NGBDh, v_cache_NGBDh)
    _, G, _, Dh = k_cache_NGBDh.shape
    if q_THDh.dim() != 3 or q_THDh.shape[2] != Dh:
        raise ValueError(f"q must be [tokens, heads, head_dim={Dh}] (the cache's head_dim); got {tuple(q_THDh.shape)}")
    H = q_THDh.shape[1]
    if H % G:
        raise ValueError(f"query heads H={H} must be a multiple of the cache's KV heads G={G}")
    for name, t, d in (("block_tables", block_tables_SM, 2), ("context_lens", context_lens_S, 1),
                       ("query_start_loc", query_start_loc_S1, 1)):
        if t.dtype != torch.int32 or t.dim() != d:
            raise TypeError(f"{name} must be a {d}-D int32 tensor (pass .to(torch.int32)); got {t.dtype} with shape "
                            f"{tuple(t.shape)}")
    S = context_lens_S.shape[0]
    if block_tables_SM.shape[0] != S or query_start_loc_S1.shape[0] != S + 1:
        raise ValueError(f"for S={S} sequences (len(context_lens)), block_tables needs S rows and query_start_loc "
                         f"S+1 entries; got {tuple(block_tables_SM.shape)} and {tuple(query_start_loc_S1.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (a token sees itself) or None for no sliding window")
    if out is not None and (out.shape != q_THDh.shape or out.dtype != q_THDh.dtype):
        raise ValueError(f"out must match q: shape {tuple(q_THDh.shape)} and dtype {q_THDh.dtype}; got "
                         f"{tuple(out.shape)} {out.dtype}")


def write_kv(k_cache_NGBDh: torch.Tensor, v_cache_NGBDh: torch.Tensor, k_TGDh: torch.Tensor, v_TGDh: torch.Tensor,
             slot_mapping_T: torch.Tensor) -> None:
    """In place: token t's keys/values go to slot ``slot_mapping_T[t]`` (= block * block_size + offset)."""
    check_cache(k_cache_NGBDh, v_cache_NGBDh)
    N, G, B, Dh = k_cache_NGBDh.shape
    T = slot_mapping_T.shape[0]
    if k_TGDh.shape != (T, G, Dh) or v_TGDh.shape != (T, G, Dh):
        raise ValueError(f"k and v must be [tokens={T}, kv_heads={G}, head_dim={Dh}] to match slot_mapping and the "
                         f"cache; got {tuple(k_TGDh.shape)} and {tuple(v_TGDh.shape)}")
    if slot_mapping_T.dtype not in (torch.int64, torch.int32) or slot_mapping_T.dim() != 1:
        raise TypeError(f"slot_mapping must be a 1-D int64 tensor; got {slot_mapping_T.dtype} {tuple(slot_mapping_T.shape)}")
    if T == 0:
        return
    if slot_mapping_T.device.type == "cpu":
        # Two scalars read back (free on CPU; skipped on accelerators, where it would stall the stream):
        # a negative slot would otherwise wrap around silently to the end of the cache.
        lo, hi = int(slot_mapping_T.min()), int(slot_mapping_T.max())
        if lo < 0 or hi >= N * B:
            raise ValueError(f"slot_mapping values must lie in [0, num_blocks*block_size={N * B}); got min {lo}, "
                             f"max {hi}")
    block_T, offset_T = slot_mapping_T.long().div(B, rounding_mode="floor"), slot_mapping_T.long() % B
    k_cache_NGBDh[block_T, :, offset_T] = k_TGDh.to(k_cache_NGBDh.dtype)
    v_cache_NGBDh[block_T, :, offset_T] = v_TGDh.to(v_cache_NGBDh.dtype)


def gather_kv(cache_NGBDh: torch.Tensor, blocks_M: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence as a contiguous ``[G, length, Dh]`` tensor."""
    N, G, B, Dh = cache_NGBDh.shape
    nb = -(-length // B)
    return cache_NGBDh[blocks_M[:nb].long()].transpose(0, 1).reshape(G, nb * B, Dh)[:, :length]


def paged_attention(q_THDh: torch.Tensor, k_cache_NGBDh: torch.Tensor, v_cache_NGBDh: torch.Tensor,
                    block_tables_SM: torch.Tensor, context_lens_S: torch.Tensor, query_start_loc_S1: torch.Tensor,
                    scale: float, window: int | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a varlen query batch over a paged KV cache; softmax in fp32, output in q's dtype.

    Head h reads KV head ``h // (H // G)``. Returns ``out`` (``[T, H, Dh]``) when given, else a new tensor.
    """
    check_paged_inputs(q_THDh, k_cache_NGBDh, v_cache_NGBDh, block_tables_SM, context_lens_S, query_start_loc_S1,
                       window, out)
    N, G, B, Dh = k_cache_NGBDh.shape
    T, H = q_THDh.shape[:2]
    # Host sync: the reference loops over sequences in Python.
    starts, lens = query_start_loc_S1.tolist(), context_lens_S.tolist()
    if starts[0] != 0 or starts[-1] != T:
        raise ValueError(f"query_start_loc must start at 0 and end at the number of query rows {T}; got {starts}")
    result = torch.empty_like(q_THDh) if out is None else out
    for s, L in enumerate(lens):
        n = starts[s + 1] - starts[s]
        if n < 1 or L < n:
            raise ValueError(f"sequence {s}: {n} query rows need 1 <= rows <= context_len; context_len is {L}")
        if -(-L // B) > block_tables_SM.shape[1]:
            raise ValueError(f"sequence {s}: context_len {L} needs {-(-L // B)} blocks; block_tables has "
                             f"{block_tables_SM.shape[1]} columns")
        k_GLDh = gather_kv(k_cache_NGBDh, block_tables_SM[s], L).float()
        v_GLDh = gather_kv(v_cache_NGBDh, block_tables_SM[s], L).float()
        p_n = torch.arange(L - n, L).unsqueeze(1)
        j_L = torch.arange(L).unsqueeze(0)
        mask_nL = j_L <= p_n
        if window is not None:
            mask_nL &= j_L > p_n - window
        q_1HnDh = q_THDh[starts[s]:starts[s + 1]].transpose(0, 1).unsqueeze(0).float()
        o_1HnDh = attention(q_1HnDh, k_GLDh.unsqueeze(0), v_GLDh.unsqueeze(0), mask_nL.unsqueeze(0), scale)
        result[starts[s]:starts[s + 1]] = o_1HnDh[0].transpose(0, 1).to(result.dtype)
    return result
