"""``KVManager``: block tables of running sequences over one or more KV pools, with prefix caching.

One pool per place that holds KV: the runner's own cache (in-process attention) or each R-worker's
(FastDecode: a CPU worker owns the KV of the sequences placed on it). A sequence lives in one pool
from admission until it finishes or is preempted; placement takes the pool with the longest prefix
hit if it has room, else the pool with the most free blocks, which balances KV load across workers.

Prefix caching: full blocks are hashed (chained, see ``memory.block_pool``) as they fill; a new
sequence shares the longest run of cached blocks of its tokens and starts computing after them. At
least the last token is always computed (its logits are needed), so a hit stops at
``(num_tokens - 1) // block_size`` blocks — a shared block is never written again.

The scheduler sees only ``can_allocate``/``allocate``/``free`` and a ``KVView`` (narrow by design:
it never touches pools or hashes).
"""

from __future__ import annotations

from dataclasses import dataclass

from bagualu.engine.request import Request
from bagualu.memory.block_pool import BlockPool, hash_block


@dataclass(frozen=True)
class KVView:
    """What the runner needs of one scheduled sequence: its pool and its block table."""

    pool: int
    block_ids: tuple[int, ...]


class KVManager:
    def __init__(self, num_pools: int, blocks_per_pool: int, block_size: int, *, prefix_caching: bool = True):
        if num_pools < 1:
            raise ValueError(f"num_pools={num_pools} must be >= 1")
        self.block_size = block_size
        self.pools = [BlockPool(blocks_per_pool, block_size) for _ in range(num_pools)]
        self.prefix_caching = prefix_caching
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of the request's leading full blocks
        self._pending_hit: dict[str, tuple[int, list[int]]] = {}  # (pool, blocks) chosen at placement
        # leading blocks of the request's table already offered to the prefix cache (cache_full_blocks)
        self._offered: dict[str, int] = {}
        self.hit_tokens = 0  # metrics: tokens served from the prefix cache at admission ...
        self.queried_tokens = 0  # ... out of the tokens admitted

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return sum(p.num_blocks for p in self.pools) * self.block_size

    @property
    def pool_capacity_tokens(self) -> int:
        return self.pools[0].num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached-free blocks count as free)."""
        total = sum(p.num_blocks for p in self.pools)
        return sum(p.num_used for p in self.pools) / total

    def view(self, req: Request) -> KVView:
        return KVView(req.pool, tuple(self._blocks[req.request_id]))

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks[request_id]

    def prefix_hit_rate(self) -> float:
        """Share of admitted tokens whose KV came from the prefix cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission -----------------------------------------------------------------------------------
    def _hash_chain(self, req: Request, num_blocks: int) -> list[bytes]:
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, req.token_ids_slice(i * bs, (i + 1) * bs)))
        return hashes

    def place(self, req: Request, num_new_tokens: int) -> int | None:
        """For a waiting request: choose a pool and find its cached prefix; returns the number of tokens
        already computed (a multiple of the block size), or None if no pool can take ``num_new_tokens``
        more tokens after the hit. Takes nothing yet: ``allocate`` does."""
        best: tuple[int, int, int, list[int]] | None = None  # (hit tokens, free blocks after, pool, hit)
        # a request scoring its prompt computes all of it (a hit's positions would have no logits)
        caching = self.prefix_caching and req.params.prompt_logprobs is None
        max_hit_blocks = (req.num_tokens - 1) // self.block_size if caching else 0
        hashes = self._hash_chain(req, max_hit_blocks) if max_hit_blocks else []
        for i, pool in enumerate(self.pools):
            hit: list[int] = []
            for h in hashes:
                b = pool.lookup(h)
                if b is None:
                    break
                hit.append(b)
            hit_tokens = len(hit) * self.block_size
            need = self._blocks_for(hit_tokens + num_new_tokens) - len(hit)
            reclaimable = sum(1 for b in hit if pool.ref_count(b) == 0)  # cached-free hits leave the free queue
            free_after = pool.num_free - reclaimable - need
            if free_after < 0:
                continue
            if best is None or (hit_tokens, free_after) > best[:2]:
                best = (hit_tokens, free_after, i, hit)
        if best is None:
            return None
        hit_tokens, _, i, hit = best
        self._pending_hit[req.request_id] = (i, hit)
        req.pool = i
        return hit_tokens

    # ---- growth and release --------------------------------------------------------------------------
    def can_allocate(self, req: Request, num_tokens_total: int) -> bool:
        have = len(self._blocks.get(req.request_id, ()))
        return self._blocks_for(num_tokens_total) - have <= self.pools[req.pool].num_free

    def allocate(self, req: Request, num_tokens_total: int) -> bool:
        """Make the request's block table cover ``num_tokens_total`` tokens. False (and no change) if
        its pool lacks blocks. The first call after ``place`` also takes the prefix-cache hit."""
        pool = self.pools[req.pool]
        rid = req.request_id
        if rid not in self._blocks:
            i, hit = self._pending_hit.pop(rid, (req.pool, []))
            if not self._enough(pool, hit, num_tokens_total):
                self._pending_hit[rid] = (i, hit)
                return False
            pool.take(hit)
            self._blocks[rid] = list(hit)
            self.hit_tokens += len(hit) * self.block_size
            self.queried_tokens += req.num_tokens
        blocks = self._blocks[rid]
        need = self._blocks_for(num_tokens_total) - len(blocks)
        if need > pool.num_free:
            return False
        if need > 0:
            blocks.extend(pool.allocate(need))
        return True

    def _enough(self, pool: BlockPool, hit: list[int], num_tokens_total: int) -> bool:
        reclaimable = sum(1 for b in hit if pool.ref_count(b) == 0)
        return self._blocks_for(num_tokens_total) - len(hit) <= pool.num_free - reclaimable

    def cache_full_blocks(self, req: Request) -> None:
        """After a step: register the request's newly full, computed blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        rid = req.request_id
        n_full = req.num_computed_tokens // self.block_size
        done = self._offered.get(rid, 0)
        if n_full <= done:  # no block filled since the last call: a decode step, most of the time
            return
        blocks = self._blocks[rid]
        hashes = self._hash_chain(req, n_full)
        pool = self.pools[req.pool]
        for j in range(done, n_full):
            pool.set_hash(blocks[j], hashes[j])
        self._offered[rid] = n_full

    def free(self, req: Request) -> None:
        """Release the request's blocks (finished, aborted or preempted); cached ones stay reusable."""
        rid = req.request_id
        self._pending_hit.pop(rid, None)
        self._offered.pop(rid, None)
        blocks = self._blocks.pop(rid, None)
        if blocks is not None:
            self.pools[req.pool].free(blocks)
        if req.finished:
            self._hashes.pop(rid, None)
