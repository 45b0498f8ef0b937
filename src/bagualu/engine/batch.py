"""``StepInputs``: the flat tensors one micro-batch of a step needs, built from the scheduler's batch.

Legend: T tokens of the micro-batch, S sequences, M max blocks per sequence, W KV pools (R-workers).

A micro-batch's tokens are laid out sequence after sequence, and sequences are grouped by the pool
that holds their KV, so pool ``w``'s tokens are the contiguous rows ``pool_tokens[w]`` and its
sequences ``pool_seqs[w]`` — an R-worker gets one slice of q/k/v and returns one slice of the output:

    tokens:  [ seq0: p p p p | seq1: d | seq2: d ][ seq3: p p | seq4: d ]
              \\---------- pool 0 -------------/  \\------ pool 1 -----/

Everything here is built on the host (lists → tensors once per step), never per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch

from bagualu.engine.request import Request


@dataclass
class PoolSlice:
    """One pool's part of a micro-batch: attention metadata in that pool's block ids."""

    tokens: tuple[int, int]  # rows [a, b) of the micro-batch's tokens
    seqs: tuple[int, int]  # sequences [a, b)
    block_tables_SM: torch.Tensor  # int32
    context_lens_S: torch.Tensor  # int32
    query_start_loc_S1: torch.Tensor  # int32, relative to the slice's first token
    slot_mapping_T: torch.Tensor  # int64

    @property
    def num_tokens(self) -> int:
        return self.tokens[1] - self.tokens[0]

    @property
    def kv_tokens(self) -> int:
        """Keys the slice's attention reads: the R-part's work."""
        return int(self.context_lens_S.sum()) if self.context_lens_S.numel() else 0


@dataclass
class StepInputs:
    requests: list[Request]
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    logits_rows: list[int]  # token rows whose logits are sampled (a sequence's last token, when due; and
    due: list[Request]  # its drafts' in a speculative step); the requests those rows belong to
    pools: list[PoolSlice]  # one per pool (empty slices included), in pool order
    # rows whose logits score the next prompt token (requests with prompt_logprobs): one span per request,
    # (request, first prompt position scored, count); their rows follow logits_rows in the runner's output
    prompt_rows: list[int] = field(default_factory=list)
    prompt_spans: list[tuple[Request, int, int]] = field(default_factory=list)
    max_position: int = 0  # the largest of positions_T, known on the host

    @property
    def num_tokens(self) -> int:
        return self.input_ids_T.shape[0]


def build_inputs(reqs: list[Request], starts: list[int], counts: list[int], block_ids: list[list[int]],
                 num_pools: int, block_size: int, device: torch.device) -> StepInputs:
    """Flatten one micro-batch (its requests already sorted by pool). Host lists first, each converted to a
    tensor once: a decode step's inputs are a few numbers per sequence, and per-sequence numpy calls cost more
    than the numbers (and run with cold caches, right after the weights streamed through)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows, due = [], []
    prompt_rows, prompt_spans = [], []
    seq_bounds = [0] * (num_pools + 1)  # sequence index where each pool starts
    tok_bounds = [0] * (num_pools + 1)
    t = 0
    pool_of = [r.pool for r in reqs]
    for i, (r, start, n, blocks) in enumerate(zip(reqs, starts, counts, block_ids)):
        ids.extend(r.token_ids_slice(start, start + n))
        positions.extend(range(start, start + n))
        for b in range(start // block_size, (start + n - 1) // block_size + 1):  # slots, a block's run at a time
            base = blocks[b] * block_size - b * block_size
            slots.extend(range(base + max(start, b * block_size), base + min(start + n, (b + 1) * block_size)))
        if r.prompt_logprobs is not None:  # positions start.. whose next token is still a prompt token
            c = min(start + n, r.num_prompt_tokens - 1) - start
            if c > 0:
                prompt_rows.extend(range(t, t + c))
                prompt_spans.append((r, start, c))
        t += n
        if start + n == r.num_tokens + len(r.draft):  # its next token is due: one row, or one per draft more
            k = len(r.draft)
            logits_rows.extend(range(t - 1 - k, t))
            due.extend([r] * (k + 1))
        seq_bounds[r.pool + 1] = i + 1
        tok_bounds[r.pool + 1] = t
    for w in range(1, num_pools + 1):  # empty pools inherit the previous bound
        seq_bounds[w] = max(seq_bounds[w], seq_bounds[w - 1])
        tok_bounds[w] = max(tok_bounds[w], tok_bounds[w - 1])
    assert pool_of == sorted(pool_of), "requests of a micro-batch must be sorted by pool"
    pools = []
    for w in range(num_pools):
        s0, s1 = seq_bounds[w], seq_bounds[w + 1]
        t0, t1 = tok_bounds[w], tok_bounds[w + 1]
        nseq = s1 - s0
        max_blocks = max((len(block_ids[i]) for i in range(s0, s1)), default=1)
        bt = np.zeros((nseq, max_blocks), dtype=np.int32)
        for j, i in enumerate(range(s0, s1)):
            bt[j, :len(block_ids[i])] = block_ids[i]
        pools.append(PoolSlice(tokens=(t0, t1), seqs=(s0, s1), block_tables_SM=torch.from_numpy(bt),
                               context_lens_S=torch.tensor([starts[i] + counts[i] for i in range(s0, s1)],
                                                           dtype=torch.int32),
                               query_start_loc_S1=torch.tensor(list(accumulate(counts[s0:s1], initial=0)),
                                                               dtype=torch.int32),
                               slot_mapping_T=torch.tensor(slots[t0:t1], dtype=torch.int64)))
    return StepInputs(requests=reqs, input_ids_T=torch.tensor(ids, dtype=torch.long, device=device),
                      positions_T=torch.tensor(positions, dtype=torch.int64, device=device), logits_rows=logits_rows,
                      due=due, pools=pools, prompt_rows=prompt_rows, prompt_spans=prompt_spans,
                      max_position=max((s + n - 1 for s, n in zip(starts, counts)), default=0))
