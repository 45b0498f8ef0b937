"""``EngineMetrics``: counters, gauges and latency histograms the engine keeps as it runs.

Plain Python (no exporter here): the HTTP server renders them in Prometheus' text format, the
benchmark reads them directly. Histogram buckets follow vLLM's for the same quantities, so dashboards
built for it read ours.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), last = +Inf
    sum: float = 0.0
    count: int = 0
    samples: list[float] = field(default_factory=list)  # raw values, for percentiles in benchmarks

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1
        if len(self.samples) < 100_000:
            self.samples.append(v)

    def percentile(self, q: float) -> float | None:
        if not self.samples:
            return None
        s = sorted(self.samples)
        return s[min(int(q / 100 * len(s)), len(s) - 1)]


@dataclass
class EngineMetrics:
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model (prefill + decode + recompute)
    preemptions: int = 0
    spec_draft_tokens: int = 0  # speculative decoding: drafts computed, and those accepted
    spec_accepted_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    steps: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    live_kv_tokens: int = 0
    prefix_cache_hit_rate: float = 0.0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    live_kv_trace: list[int] = field(default_factory=list)  # live KV tokens per step (bounded)

    def record_step(self, live_kv: int) -> None:
        self.steps += 1
        self.live_kv_tokens = live_kv
        if len(self.live_kv_trace) < 1_000_000:
            self.live_kv_trace.append(live_kv)
