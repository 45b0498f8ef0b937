"""``/metrics``: the engine's ``EngineMetrics`` in Prometheus' text format, through ``prometheus_client``.

A custom collector reads the engine's counters at scrape time instead of mirroring them into
``prometheus_client`` objects on every step, so the engine thread pays nothing for metrics. Names
follow vLLM's (``bagualu_`` instead of ``vllm:``), with a ``model_name`` label, so dashboards carry over:

    bagualu_num_requests_running / _waiting        gauge   sequences running / queued
    bagualu_kv_cache_usage_perc                     gauge   fraction of KV blocks in use (0..1)
    bagualu_num_preemptions_total                   counter preemptions by recompute
    bagualu_prompt_tokens_total / generation_tokens_total
    bagualu_spec_decode_num_draft_tokens_total / _num_accepted_tokens_total   speculative decoding
    bagualu_request_success_total{finished_reason}  counter finished sequences (stop, length, abort)
    bagualu_requests_rejected_total{reason}         counter refused before queueing (overloaded, loading, ...)
    bagualu_time_to_first_token_seconds             histogram
    bagualu_time_per_output_token_seconds           histogram
    bagualu_e2e_request_latency_seconds             histogram
    bagualu_engine_healthy                          gauge   1 while the engine loop runs and takes requests

The engine thread writes while a scrape reads; a histogram's count is derived from its buckets so
the exposition stays self-consistent (``_sum`` may lag by the one observation in flight).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from bagualu.engine.async_engine import AsyncEngine
from bagualu.engine.metrics import Histogram

P = "bagualu_"


def _histogram(name: str, doc: str, h: Histogram, model: str) -> HistogramMetricFamily:
    counts = list(h.counts)  # one copy; the engine thread may append meanwhile
    buckets, total = [], 0
    for le, c in zip(h.buckets, counts):
        total += c
        buckets.append((repr(float(le)), total))
    total += counts[-1]
    buckets.append(("+Inf", total))
    fam = HistogramMetricFamily(P + name, doc, labels=["model_name"])
    fam.add_metric([model], buckets, sum_value=h.sum)
    return fam


class EngineCollector:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine, self.model = engine, model_name

    def collect(self):
        eng, model = self.engine, self.model
        healthy = GaugeMetricFamily(P + "engine_healthy", "1 while the engine loop runs and takes requests",
                                    labels=["model_name"])
        healthy.add_metric([model], float(eng.healthy))
        yield healthy
        rejected = CounterMetricFamily(P + "requests_rejected", "Requests refused before queueing, by reason",
                                       labels=["model_name", "reason"])
        for reason, n in sorted(eng.rejected.items()):
            rejected.add_metric([model, reason], n)
        yield rejected
        m = eng.metrics
        if m is None:  # still loading
            return
        for name, doc, value in [
            ("num_requests_running", "Sequences in the running batch", m.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled", m.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)", m.kv_usage),
            ("live_kv_tokens", "Tokens of KV held by running sequences", m.live_kv_tokens),
            ("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache", m.prefix_cache_hit_rate),
        ]:
            g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
            g.add_metric([model], float(value))
            yield g
        for name, doc, value in [
            ("num_preemptions", "Preemptions by recompute", m.preemptions),
            ("prompt_tokens", "Prompt tokens of admitted requests", m.prompt_tokens),
            ("generation_tokens", "Generated tokens", m.generation_tokens),
            ("computed_tokens", "Tokens run through the model (prefill, decode and recompute)", m.computed_tokens),
            ("engine_steps", "Engine steps", m.steps),
            ("spec_decode_num_draft_tokens", "Speculative draft tokens computed", m.spec_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted", m.spec_accepted_tokens),
        ]:
            c = CounterMetricFamily(P + name, doc, labels=["model_name"])
            c.add_metric([model], value)
            yield c
        done = CounterMetricFamily(P + "request_success", "Finished sequences by finish reason",
                                   labels=["model_name", "finished_reason"])
        for reason, n in sorted(dict(m.requests_finished).items()):
            done.add_metric([model, reason], n)
        yield done
        yield _histogram("time_to_first_token_seconds", "Time to first token", m.ttft, model)
        yield _histogram("time_per_output_token_seconds", "Time per output token after the first", m.tpot, model)
        yield _histogram("e2e_request_latency_seconds", "Arrival to finish", m.e2e, model)


class MetricsExporter:
    """A registry of its own (not the global one: several servers in one process stay apart)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine, model_name))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
