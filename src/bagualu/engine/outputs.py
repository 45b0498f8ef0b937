"""What the engine hands back: ``RequestOutput`` with one ``CompletionOutput`` per sequence (``n``).

Field names follow vLLM's, so code written against it reads these unchanged; ``RequestOutput.text`` and
``.token_ids`` are the first completion's, for the common ``n == 1`` case. Outputs are cumulative (the
whole text so far); a stream takes the difference with what it has sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: the top alternatives (and the sampled one)
    token_logprobs: list[float] | None = None  # per token: the sampled token's logprob
    stream_upto: int = 0  # how much of ``text`` may be streamed now (stop-string hold-back)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.token_logprobs is None else float(sum(self.token_logprobs))


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: per prompt token (None for the first), its logprob given the
    tokens before it, and the top alternatives'."""

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
