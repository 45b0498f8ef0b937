"""``Scheduler``: continuous batching under a token budget — no prefill/decode phases, no device calls.

Each step hands out ``{request_id: n_tokens}`` with ``Σ n ≤ max_num_batched_tokens``: running requests
first, in arrival order (a decoding one needs 1 token, plus its speculative drafts if it has any; one
mid-prompt gets as much of its prompt as the budget allows — chunked prefill falls out of this), then
waiting ones while sequences and budget last.
When a running request's pool has no block for its next tokens, the most recently admitted running
request of that pool is preempted (blocks freed, recomputed later; counted), as vLLM v1 does.

Admission policies (``SchedulerConfig.admission``):

- ``"greedy"``: admit while blocks are free (vLLM). Fast start, but live KV saw-tooths — it climbs as
  the batch decodes and collapses when a cohort finishes — and an optimistic admission can force
  preemptions later.
- ``"steady"``: FastDecode's load-stabilising admission. A request is admitted to a pool only if the
  pool's *projected peak* live KV stays under ``kv_target`` of its capacity, where the projection
  assumes every sequence (the newcomer included) grows one token per step until ``max_tokens``:
  ``peak = max_t Σ_{r: rem_r > t} (len_r + t)``. Live KV (hence the R-part's per-step time) is then
  bounded for the whole future, admissions happen as sequences finish rather than in cohorts, and
  preemption cannot happen unless the bound is set above capacity.

Tests drive this class with fake requests and no tensors.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from bagualu.engine.kv_manager import KVManager
from bagualu.engine.request import Request, Status

ADMISSION_POLICIES = ("greedy", "steady")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prompt chunks + one token per decoding sequence)."""
    admission: str = "greedy"
    kv_target: float = 1.0
    """``steady`` admission: projected peak live KV as a fraction of a pool's capacity."""

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission={self.admission!r} is not one of {ADMISSION_POLICIES}")
        if not 0 < self.kv_target <= 4:
            raise ValueError(f"kv_target={self.kv_target} must be in (0, 4] (a fraction of KV capacity)")


@dataclass
class ScheduledBatch:
    """One step's work. ``requests[i]`` computes ``num_tokens[i]`` tokens from ``start[i]``."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def as_dict(self) -> dict[str, int]:
        return {r.request_id: n for r, n in zip(self.requests, self.num_tokens)}


def projected_peak(lens_and_remaining: list[tuple[int, int]], block_size: int = 1) -> int:
    """Peak of ``Σ_{r: rem_r > t} ceil_bs(len_r + t)`` over ``t ≥ 0``: the most KV token slots the given
    sequences can hold at once if each grows one token per step for ``rem_r`` more steps.

    Between finishes the sum grows, so its maximum sits at ``t = 0`` or just before some sequence
    finishes (``t = rem_r - 1``). Block rounding is bounded by ``block_size - 1`` slots per sequence.
    """
    live = [(rem, ln) for ln, rem in lens_and_remaining if rem > 0]
    if not live:
        return 0
    live.sort()
    rems = [r for r, _ in live]
    suffix_len = [0] * (len(live) + 1)
    for i in range(len(live) - 1, -1, -1):
        suffix_len[i] = suffix_len[i + 1] + live[i][1]
    pad = block_size - 1
    best = suffix_len[0] + len(live) * pad
    for r in set(rems):
        t = r - 1
        i = bisect.bisect_right(rems, t)  # sequences with rem > t
        cnt = len(live) - i
        best = max(best, suffix_len[i] + cnt * (t + pad))
    return best


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        """Remove a request wherever it is and free its blocks (idempotent)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.finished:
            req.finish("abort")
        self.kv.free(req)

    def finish(self, req: Request) -> None:
        """A running request finished in ``update``: drop it and free its blocks."""
        self.running.remove(req)
        self.kv.free(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def live_kv_tokens(self) -> int:
        return sum(r.num_computed_tokens for r in self.running)

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        out = ScheduledBatch()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = req.num_tokens - req.num_computed_tokens
            if req.draft:  # a speculative step: its drafts as far as the budget goes
                req.draft = req.draft[:max(budget - n, 0)]
                n += len(req.draft)
            n = min(n, budget)
            if n <= 0:  # nothing to compute (cannot happen for a running request; guard the budget)
                i += 1
                continue
            while not self.kv.allocate(req, req.num_computed_tokens + n):
                victim = self._victim(req.pool)
                if self.running.index(victim) < i:  # already scheduled this step: take its tokens back
                    j = out.requests.index(victim)
                    budget += out.num_tokens[j]
                    del out.requests[j], out.num_tokens[j], out.start[j]
                    i -= 1
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_tokens.append(n)
                out.start.append(req.num_computed_tokens)
                budget -= n
                i += 1
        if out.preempted:  # memory is short: do not admit anyone this step
            return out
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.place(req, 1)
            if hit is None:
                break
            n = min(req.num_tokens - hit, budget)
            if cfg.admission == "steady" and not self._steady_admits(req, hit):
                self.kv.free(req)
                req.pool = None
                break
            if not self.kv.allocate(req, hit + n):
                self.kv.free(req)
                req.pool = None
                break
            self.waiting.popleft()
            req.num_computed_tokens = hit
            req.status = Status.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_tokens.append(n)
            out.start.append(hit)
            budget -= n
        return out

    def _victim(self, pool: int) -> Request:
        for r in reversed(self.running):
            if r.pool == pool:
                return r
        raise AssertionError("a pool ran out of blocks with no running request in it")

    def _preempt(self, victim: Request, out: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        out.preempted.append(victim)

    def _steady_admits(self, req: Request, hit: int) -> bool:
        pool = req.pool
        live = [(r.num_tokens, r.remaining_tokens) for r in self.running if r.pool == pool]
        live.append((req.num_tokens, max(req.remaining_tokens, 1)))
        limit = self.config.kv_target * self.kv.pool_capacity_tokens
        if projected_peak(live, self.kv.block_size) <= limit:
            return True
        # a lone request always runs (else nothing ever would); the kv manager still checks the blocks
        return not any(r.pool == pool for r in self.running)

    # ---- after the runner ----------------------------------------------------------------------------
    def advance(self, batch: ScheduledBatch) -> list[Request]:
        """Count the computed tokens; returns the requests whose next token is due (all their tokens
        are now in the cache), in batch order."""
        due = []
        for req, n in zip(batch.requests, batch.num_tokens):
            req.num_computed_tokens += n - len(req.draft)  # drafts count once accepted (EngineCore.step)
            self.kv.cache_full_blocks(req)
            if req.num_computed_tokens == req.num_tokens:
                due.append(req)
        return due
