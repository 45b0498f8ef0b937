"""``BlockPool``: CPU bookkeeping of a paged KV cache — free list, reference counts, prefix cache.

The KV cache is ``num_blocks`` fixed-size blocks of ``block_size`` token slots; the tensors live
elsewhere (the engine's runner or an R-worker), this class only hands out block ids. A block is

    in use      ref_count > 0 (one per sequence whose block table holds it)
    free        ref_count == 0, in the free queue; it may still carry a prefix hash, and then a new
                sequence with the same prefix can take it back ("cached free") until it is evicted

Eviction is least-recently-freed first: the free queue is an ordered dict popped from its front, and a
sequence's blocks are freed tail first, so the block that closes a long prefix goes before the block
that starts it (the start is what other prompts share). This is vLLM's v1 design; the rejected
alternative — a separate cache that owns blocks — would need two capacities to tune and copies to
move blocks between them.

Prefix hashes chain: a full block's hash covers its tokens *and* its parent's hash, so equal hashes
mean equal whole prefixes (``hash_block``). blake2b, not Python's ``hash``, so a hash is stable across
processes and collisions need a 128-bit accident.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def hash_block(parent: bytes | None, tokens) -> bytes:
    """128-bit hash of a full block of token ids, chained on the parent block's hash (None for the first)."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    """Block ids ``0 .. num_blocks-1`` with reference counts and a hash → block prefix cache.

    Invariants: a block is in ``_free`` iff its ref count is 0; ``_cached[h] == b`` iff ``_hash_of[b] == h``;
    a hash is only set on a block that is full (the caller promises it) and cleared when the block is
    evicted for reuse.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be positive; give the KV cache more memory")
        if block_size <= 0:
            raise ValueError(f"block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks a new allocation may take (free, including cached-free ones that would be evicted)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with ref count 1, evicting cached-free blocks as needed; raises if fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks but only {len(self._free)} are free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of[b]
            if h is not None:
                del self._cached[h]
                self._hash_of[b] = None
            self._ref[b] = 1
            out.append(b)
        return out

    def lookup(self, h: bytes) -> int | None:
        """The block holding the prefix with hash ``h``, in use or cached-free; None if not cached."""
        return self._cached.get(h)

    def take(self, blocks: list[int]) -> None:
        """Share cached blocks (from ``lookup``) with one more sequence."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def set_hash(self, block: int, h: bytes) -> None:
        """Register a full, in-use block under its prefix hash (first writer wins on duplicates)."""
        if self._hash_of[block] is not None or h in self._cached:
            return
        self._hash_of[block] = h
        self._cached[h] = block

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block, tail first (see the module docstring for why)."""
        for b in reversed(blocks):
            if self._ref[b] <= 0:
                raise RuntimeError(f"KV block {b} freed more often than taken (ref count {self._ref[b]})")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after weights change); blocks in use stay in use."""
        self._cached.clear()
        self._hash_of = [None] * self.num_blocks
