"""``Request``: one sequence's state in the engine — tokens, progress, placement, timing.

There are no prefill/decode phases: a request is ``num_computed_tokens`` (KV already in the cache)
against ``num_tokens`` (prompt + generated). A step schedules ``n`` more tokens of it; once
``num_computed_tokens == num_tokens`` after a step, the step's last logits give the next token.

    tokens:   [ p0 p1 p2 p3 p4 | o0 o1 ]        num_tokens = 7
    computed: [ ######## ]                       num_computed_tokens = 4 (chunked prefill under way)

Preemption by recompute resets ``num_computed_tokens`` to 0 and keeps the generated tokens: on
readmission the prompt *and* the outputs are prefilled again (the prefix cache often still has them).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from bagualu.engine.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, kw_only=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    pool: int | None = None  # which KV pool (R-worker) holds its blocks while running
    num_preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    generator: torch.Generator | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token: id -> logprob
    sampled_logprobs: list[float] = field(default_factory=list)
    matcher: object | None = None  # its structured output's xgrammar GrammarMatcher (engine.structured)
    draft: list[int] = field(default_factory=list)  # this step's speculative tokens (engine.speculative)
    ngrams: dict | None = None  # the prompt-lookup index of its tokens, and how far it is built
    ngrams_upto: int = 0
    # per prompt token (None for the first): id -> logprob, the prompt's token and the top alternatives
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        if stop > self.num_tokens:  # a speculative step's drafts follow the last token
            return self.token_ids_slice(start, self.num_tokens) + self.draft[:stop - self.num_tokens]
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    @property
    def max_total_tokens(self) -> int:
        """The longest this sequence can grow: prompt + max_tokens, capped by the context."""
        m = self.params.max_tokens
        cap = self.max_model_len if m is None else self.num_prompt_tokens + m
        return min(cap, self.max_model_len)

    @property
    def remaining_tokens(self) -> int:
        """Tokens it may still generate (an upper bound; a stop condition may end it sooner)."""
        return max(self.max_total_tokens - self.num_tokens, 0)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, now: float) -> None:
        self.output_token_ids.append(token)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def stop_token_ids_all(self) -> tuple[int, ...]:
        """Token ids that end this sequence: its stop ids, and EOS unless ``ignore_eos``."""
        eos = () if self.params.ignore_eos else self.eos_token_ids
        return tuple(eos) + self.params.stop_token_ids

    def check_stop_token(self) -> bool:
        """After appending a token: finish on EOS / stop token ids / length. Stop strings are the
        detokenizer's job (they need text). Returns True when finished here."""
        p = self.params
        tok = self.output_token_ids[-1]
        n_out = len(self.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                return self.finish("stop", tok)
            if tok in p.stop_token_ids:
                return self.finish("stop", tok)
        if self.num_tokens >= self.max_total_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: str, stop_reason: str | int | None = None) -> bool:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        return True

    def reset_for_recompute(self) -> None:
        """Preempted: its KV is gone; everything (prompt and outputs so far) is computed again."""
        self.num_computed_tokens = 0
        self.draft = []
        self.status = Status.WAITING
        self.pool = None
        self.num_preemptions += 1
