"""The expert-parallel planner: capacity's prefix rule, the shadowing cost model, the schedule choice."""

from __future__ import annotations

import pytest

from bagualu.moe.ep_plan import ShadowCost, apply_capacity, choose_schedule, choose_shadows, make_plan

pytestmark = pytest.mark.unit
COST = ShadowCost(row_bytes=4 * 512 * 4, row_flops=18 * 512 * 1024, expert_bytes=3 * 512 * 1024 * 4,
                  link_bw=3e9, flops=1.5e11)


def test_capacity_keeps_earliest_sources_first():
    counts = [[5, 1], [4, 2]]  # [source rank][expert]
    assert apply_capacity(counts, 6) == [[5, 1], [1, 2]]
    assert apply_capacity(counts, 3) == [[3, 1], [0, 2]]
    assert apply_capacity(counts, None) == counts


def test_plan_splits_routes_between_exchange_and_shadows():
    counts = [[10, 1, 1, 1], [9, 1, 1, 1]]
    plan = make_plan(counts, [6, 6], 1, top_k=2, capacity_factor=None, shadow=1, cost=None)
    assert plan.shadow == (0,)
    assert plan.exchanged(1) == [0, 1, 1, 1] and plan.shadowed(1) == [9, 0, 0, 0]
    assert plan.send_counts(0) == [0, 1] and plan.recv_counts(0) == [1, 1]
    assert plan.dropped == 0
    capped = make_plan(counts, [6, 6], 1, top_k=2, capacity_factor=1.0, shadow="off", cost=None)
    assert capped.kept == [[6, 1, 1, 1], [0, 1, 1, 1]] and capped.dropped == 9


def test_cost_model_shadows_hot_experts_only_when_it_pays():
    skewed = [[3000, 10, 10, 10], [3000, 10, 10, 10]]
    assert choose_shadows(skewed, 2, COST, max_shadows=2) == (0,)
    flat = [[100, 100, 100, 100], [100, 100, 100, 100]]
    assert choose_shadows(flat, 2, COST, max_shadows=2) == ()
    slow_link = ShadowCost(**{**COST.__dict__, "link_bw": 1e6})
    assert choose_shadows(skewed, 2, slow_link, max_shadows=2) == (0,)  # tokens are costlier still
    with pytest.raises(ValueError, match="shadow='auto' needs a cost model"):
        make_plan(skewed, [1, 1], 0, top_k=1, capacity_factor=None, shadow="auto", cost=None)


def test_schedule_choice():
    big = make_plan([[4000, 4000], [4000, 4000]], [4000, 4000], 0, top_k=2, capacity_factor=None, shadow="off",
                    cost=None)
    tiny = make_plan([[2, 2], [2, 2]], [2, 2], 0, top_k=2, capacity_factor=None, shadow="off", cost=None)
    assert choose_schedule(big, COST) == "pipelined"
    assert choose_schedule(tiny, COST) == "all_to_all"
    assert choose_schedule(big, None) == "all_to_all"
