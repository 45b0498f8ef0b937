"""Block pool and KV manager: ref counts, free list order, prefix cache hits and eviction, pool placement."""

import pytest

from bagualu.engine.kv_manager import KVManager
from bagualu.engine.params import SamplingParams
from bagualu.engine.request import Request
from bagualu.memory.block_pool import BlockPool, hash_block


def req(rid, tokens, max_tokens=4):
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams(max_tokens=max_tokens))


def test_pool_allocate_free_refcount_and_errors():
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(MemoryError, match="only 1 are free"):
        pool.allocate(2)
    pool.take([a[0]])
    pool.free(a)
    assert pool.ref_count(a[0]) == 1 and pool.num_free == 3
    pool.free([a[0]])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a[0]])
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockPool(0, 16)


def test_cached_free_blocks_are_reused_then_evicted_oldest_first():
    pool = BlockPool(3, 2)
    b = pool.allocate(2)
    h0 = hash_block(None, [1, 2])
    h1 = hash_block(h0, [3, 4])
    pool.set_hash(b[0], h0)
    pool.set_hash(b[1], h1)
    pool.free(b)  # tail first: b[1] is evicted before b[0]
    assert pool.lookup(h0) == b[0] and pool.lookup(h1) == b[1]
    pool.take([b[0]])  # a hit takes a cached-free block back
    assert pool.ref_count(b[0]) == 1 and pool.num_free == 2
    new = pool.allocate(2)  # evicts the never-hashed block 2, then b[1]
    assert set(new) == {2, b[1]}
    assert pool.lookup(h1) is None and pool.lookup(h0) == b[0]


def test_hash_chain_depends_on_the_whole_prefix():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])


def test_prefix_hit_shares_blocks_and_never_covers_the_last_token():
    kv = KVManager(1, 8, 4)
    a = req("a", range(10))
    assert kv.place(a, 10) == 0
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)  # blocks 0..1 full (8 tokens), block 2 partial
    b = req("b", list(range(8)) + [99, 98])  # shares 8 tokens = 2 blocks
    assert kv.place(b, 2) == 8
    assert kv.allocate(b, 10)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    c = req("c", range(8))  # whole prompt cached: the last token must still be computed
    assert kv.place(c, 8) == 4
    assert kv.prefix_hit_rate() == pytest.approx(8 / 20)
    no_cache = KVManager(1, 8, 4, prefix_caching=False)
    assert no_cache.place(req("d", range(10)), 10) == 0


def test_blocks_filled_while_decoding_are_cached_as_they_fill():
    kv = KVManager(1, 8, 4)
    a = req("a", range(6), max_tokens=8)
    assert kv.place(a, 6) == 0 and kv.allocate(a, 6)
    a.num_computed_tokens = 6
    kv.cache_full_blocks(a)  # block 0 full
    for t in range(100, 107):  # decode steps: one token each, computed the step after it was drawn
        a.append_token(t, 0.0)
        assert kv.allocate(a, a.num_tokens)
        a.num_computed_tokens = a.num_tokens
        kv.cache_full_blocks(a)  # blocks 1 (at 8 tokens) and 2 (at 12) fill on the way
    seq = list(range(6)) + list(range(100, 107))
    b = req("b", seq[:12] + [55])
    assert kv.place(b, 1) == 12  # the prompt's block and both blocks its decode filled
    kv.free(a)  # preempted; then another request evicts every cached block
    x = req("x", range(1000, 1032))
    assert kv.place(x, 32) == 0 and kv.allocate(x, 32)
    kv.free(x)
    a2 = req("a", seq, max_tokens=8)  # recomputed into fresh blocks, which are cached in their turn
    assert kv.place(a2, 13) == 0 and kv.allocate(a2, 13)
    a2.num_computed_tokens = 13
    kv.cache_full_blocks(a2)
    assert kv.place(req("c", seq[:12] + [55]), 1) == 12


def test_free_keeps_shared_blocks_for_the_other_sequence():
    kv = KVManager(1, 6, 4)
    a, b = req("a", range(9)), req("b", range(9))
    kv.place(a, 9)
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    kv.place(b, 1)
    kv.allocate(b, 9)
    shared = kv.block_ids("a")[:2]
    kv.free(a)
    assert all(kv.pools[0].ref_count(x) == 1 for x in shared)
    assert kv.usage() == pytest.approx(3 / 6)


def test_placement_balances_pools_and_prefers_a_prefix_hit():
    kv = KVManager(2, 4, 4)
    a = req("a", range(9))
    kv.place(a, 9)
    kv.allocate(a, 9)  # 3 blocks in one pool
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    b = req("b", [7] * 5)
    kv.place(b, 5)
    assert b.pool != a.pool  # the emptier pool
    c = req("c", list(range(8)) + [5])
    assert kv.place(c, 1) == 8 and c.pool == a.pool  # the hit wins while the pool has room
    big = req("big", range(100, 120))
    assert kv.place(big, 20) is None  # 5 blocks fit in no pool
