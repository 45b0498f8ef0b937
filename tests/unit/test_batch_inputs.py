"""``engine.batch.build_inputs``: a micro-batch's flat inputs, checked against their definitions."""

from __future__ import annotations

import torch

from bagualu.engine.batch import build_inputs
from bagualu.engine.params import SamplingParams
from bagualu.engine.request import Request


def _req(rid: str, prompt: int, out: int, pool: int) -> Request:
    r = Request(request_id=rid, prompt_token_ids=list(range(100, 100 + prompt)), params=SamplingParams(max_tokens=50))
    r.output_token_ids = list(range(7, 7 + out))
    r.pool = pool
    return r


def test_positions_slots_and_pool_slices_follow_the_block_tables():
    B = 4
    # a prefill chunk crossing three blocks, a decode token at a block's first slot, one at a block's last,
    # and a pool-1 prefill from position 0; pools sorted as the engine passes them
    reqs = [_req("a", 20, 0, 0), _req("b", 8, 1, 0), _req("c", 6, 2, 0), _req("d", 5, 0, 1)]
    starts, counts = [3, 8, 7, 0], [9, 1, 1, 5]
    blocks = [[11, 4, 9, 2, 30], [5, 6, 8], [1, 0], [3, 7]]
    st = build_inputs(reqs, starts, counts, blocks, 2, B, torch.device("cpu"))
    want_pos = [p for s, n in zip(starts, counts) for p in range(s, s + n)]
    want_slots = [blocks[i][p // B] * B + p % B for i, (s, n) in enumerate(zip(starts, counts)) for p in range(s, s + n)]
    assert st.positions_T.tolist() == want_pos and st.positions_T.dtype is torch.int64
    assert st.input_ids_T.tolist() == [t for r, s, n in zip(reqs, starts, counts) for t in r.token_ids_slice(s, s + n)]
    assert st.max_position == max(want_pos)
    p0, p1 = st.pools
    assert (p0.tokens, p0.seqs, p1.tokens, p1.seqs) == ((0, 11), (0, 3), (11, 16), (3, 4))
    assert p0.slot_mapping_T.tolist() == want_slots[:11] and p1.slot_mapping_T.tolist() == want_slots[11:]
    assert p0.slot_mapping_T.dtype is torch.int64
    assert p0.context_lens_S.tolist() == [12, 9, 8] and p1.context_lens_S.tolist() == [5]
    assert p0.query_start_loc_S1.tolist() == [0, 9, 10, 11] and p1.query_start_loc_S1.tolist() == [0, 5]
    assert p0.query_start_loc_S1.dtype is torch.int32 and p0.context_lens_S.dtype is torch.int32
    assert p0.block_tables_SM.tolist() == [[11, 4, 9, 2, 30], [5, 6, 8, 0, 0], [1, 0, 0, 0, 0]]
    # b, c and d reach their ends: their next tokens are due; a is mid-prefill
    assert st.logits_rows == [9, 10, 15] and [r.request_id for r in st.due] == ["b", "c", "d"]


def test_an_empty_pool_gets_an_empty_slice():
    st = build_inputs([_req("a", 4, 1, 1)], [4], [1], [[2, 6]], 3, 4, torch.device("cpu"))
    assert [p.tokens for p in st.pools] == [(0, 0), (0, 1), (1, 1)]
    assert st.pools[0].slot_mapping_T.shape == (0,) and st.pools[0].query_start_loc_S1.tolist() == [0]
    assert st.pools[1].slot_mapping_T.tolist() == [6 * 4 + 0] and st.pools[2].context_lens_S.shape == (0,)
