"""``SamplingParams``: what a request asks of the sampler, validated on construction.

Field names and meanings follow vLLM's ``SamplingParams`` (and through it the OpenAI API), so users
and the HTTP front end map onto it without translation. Order of application in the sampler: logit bias →
structured-output mask → repetition penalty → presence/frequency penalties → temperature → top-k → top-p →
min-p → draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bagualu.engine.structured import StructuredOutput


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    n: int = 1
    """Completions per prompt; each is an independent sequence sharing the prompt's cached KV blocks."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 means no top-k cut."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """HF/CTRL style: a seen (prompt or output) token's logit is divided by it if positive, else multiplied."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    max_tokens: int | None = 16
    """None = up to the model's context length."""
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives (0 = only the sampled)."""
    prompt_logprobs: int | None = None
    """Also the log-probability of every prompt token after the first given the ones before it, with this many
    top alternatives (0 = only the prompt's token). Such a request computes its whole prompt (no prefix-cache
    hit): what ``echo`` with ``logprobs`` scores (an evaluation harness's loglikelihood)."""
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    """Token id -> a value in [-100, 100] added to its logit before everything else (OpenAI's ``logit_bias``:
    -100 bans a token, +100 all but forces it). Reported logprobs stay those of the raw distribution."""
    structured_output: StructuredOutput | None = None
    """Constrain the tokens to a JSON schema, any JSON object, a regex or a grammar (``engine.structured``);
    the sequence ends when the grammar is complete (``min_tokens`` and ``ignore_eos`` do not apply)."""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _bias(self.logit_bias))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check(self.n >= 1, f"n={self.n} must be >= 1")
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        _check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 or -1 = no cut)")
        _check(0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]")
        _check(self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        _check(-2 <= self.presence_penalty <= 2, f"presence_penalty={self.presence_penalty} must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]")
        _check(self.max_tokens is None or self.max_tokens >= 1,
               f"max_tokens={self.max_tokens} must be >= 1 (or None for the rest of the context)")
        _check(self.min_tokens >= 0, f"min_tokens={self.min_tokens} must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs={self.logprobs} must be in [0, 20]")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
               f"prompt_logprobs={self.prompt_logprobs} must be in [0, 20]")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop={self.stop!r} must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def needs_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


def _bias(bias) -> dict[int, float] | None:
    try:
        out = {int(t): float(b) for t, b in dict(bias).items()}
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias={bias!r} must map token ids to numbers") from None
    bad = [t for t, b in out.items() if t < 0 or not -100 <= b <= 100]
    _check(not bad, f"logit_bias={bias!r}: token ids must be >= 0 and biases in [-100, 100] (see token {bad[:1]})")
    return out or None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
