"""Scheduler: token budget, chunked prefill, sequence limit, preemption by recompute, steady admission.

Driven with requests and the KV manager only — no model, no tensors (STYLE 9).
"""

import itertools
import random

import pytest

from bagualu.engine.kv_manager import KVManager
from bagualu.engine.params import SamplingParams
from bagualu.engine.request import Request, Status
from bagualu.engine.scheduler import Scheduler, SchedulerConfig, projected_peak


def mk(rid, n_prompt, max_tokens=8):
    return Request(request_id=rid, prompt_token_ids=[1] * n_prompt, params=SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler, token=5):
    """Play the runner and sampler: every due request gets ``token``; finish by length."""
    batch = s.schedule()
    for r in s.advance(batch):
        r.append_token(token, 0.0)
        if r.check_stop_token():
            s.finish(r)
    return batch


def test_chunked_prefill_under_the_token_budget_then_decode():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10), KVManager(1, 64, 4, prefix_caching=False))
    a, b = mk("a", 7), mk("b", 6)
    s.add(a)
    s.add(b)
    assert run_step(s).as_dict() == {"a": 7, "b": 3}  # b's prompt is chunked
    assert len(a.output_token_ids) == 1 and not b.output_token_ids
    assert run_step(s).as_dict() == {"a": 1, "b": 3}  # a decodes, b finishes its prompt
    assert len(b.output_token_ids) == 1
    assert run_step(s).as_dict() == {"a": 1, "b": 1}


def test_max_num_seqs_and_finish_frees_blocks():
    kv = KVManager(1, 64, 4, prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=2), kv)
    for i in range(3):
        s.add(mk(f"r{i}", 4, max_tokens=2))
    assert set(run_step(s).as_dict()) == {"r0", "r1"}
    run_step(s)  # r0, r1 reach max_tokens=2 and finish
    assert not s.running and kv.usage() == 0
    assert run_step(s).as_dict() == {"r2": 4}


def test_preemption_by_recompute_when_blocks_run_out():
    kv = KVManager(1, 4, 4, prefix_caching=False)  # 16 token slots
    s = Scheduler(SchedulerConfig(), kv)
    a, b = mk("a", 7, max_tokens=8), mk("b", 7, max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s)  # both admitted: 2 blocks each (7 prompt tokens, then 1 output)
    run_step(s)  # 8 tokens each in the cache: the blocks are full
    batch = run_step(s)  # both need a 3rd block: b (last admitted) is preempted, a runs
    assert [r.request_id for r in batch.preempted] == ["b"] and batch.as_dict() == {"a": 1}
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b and s.num_preemptions == 1
    while not a.finished:
        run_step(s)
    batch = run_step(s)
    assert batch.as_dict() == {"b": 9}  # prompt and its two outputs recomputed
    while s.has_work:
        run_step(s)
    assert b.finished and len(b.output_token_ids) == 8


def test_preempting_an_already_scheduled_request_returns_its_budget():
    kv = KVManager(2, 2, 4, prefix_caching=False)
    s = Scheduler(SchedulerConfig(), kv)
    reqs = [mk(f"r{i}", 3, max_tokens=20) for i in range(4)]
    for r in reqs:
        s.add(r)
    for _ in range(12):
        batch = run_step(s)
        assert len(set(batch.as_dict())) == len(batch)
        assert not set(batch.as_dict()) & {r.request_id for r in batch.preempted}
    assert s.num_preemptions > 0


def brute_peak(items, bs):
    best = 0
    for t in range(max((r for _, r in items), default=0) + 1):
        best = max(best, sum(-(-(ln + t) // bs) * bs if bs > 1 else ln + t for ln, r in items if r > t))
    return best


@pytest.mark.parametrize("bs", [1, 4])
def test_projected_peak_bounds_the_brute_force(bs):
    rng = random.Random(0)
    for _ in range(200):
        items = [(rng.randint(1, 50), rng.randint(0, 30)) for _ in range(rng.randint(0, 8))]
        exact = brute_peak(items, 1)
        bound = projected_peak(items, bs)
        assert bound >= brute_peak(items, bs) if bs > 1 else bound == exact


def test_steady_admission_bounds_live_kv_and_never_preempts():
    rng = random.Random(1)
    kv = KVManager(1, 32, 4)  # 128 slots
    s = Scheduler(SchedulerConfig(admission="steady", kv_target=1.0), kv)
    ids = itertools.count()
    for _ in range(30):
        s.add(Request(request_id=str(next(ids)), prompt_token_ids=[rng.randint(0, 9) for _ in range(rng.randint(4, 20))],
                      params=SamplingParams(max_tokens=rng.randint(4, 24))))
    peak = 0
    while s.has_work:
        run_step(s)
        peak = max(peak, kv.pools[0].num_used * 4)
    assert s.num_preemptions == 0 and peak <= 128
    greedy = Scheduler(SchedulerConfig(admission="greedy"), KVManager(1, 32, 4))
    rng = random.Random(1)
    for _ in range(30):
        greedy.add(Request(request_id=str(next(ids)), params=SamplingParams(max_tokens=rng.randint(4, 24)),
                           prompt_token_ids=[rng.randint(0, 9) for _ in range(rng.randint(4, 20))]))
    while greedy.has_work:
        run_step(greedy)
    assert greedy.num_preemptions > 0  # the same load preempts under greedy admission


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="admission='fifo'"):
        SchedulerConfig(admission="fifo")
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        SchedulerConfig(max_num_batched_tokens=0)
