"""Adaptive batch size: small numerous items in large batches, large items alone,
shallow queues an item at a time; the call-cost fit recovers a known cost."""

from __future__ import annotations

import random

import pytest

from fleet.queue.batching_model import CallCost, CallCostEstimator, choose_batch_size

COST = CallCost(overhead_s=2e-3, per_item_s=20e-6, per_byte_s=1e-9)
BOUNDS = dict(free_capacity=10_000, max_items=512, max_bytes=1 << 20)


def test_shallow_queue_sends_what_it_has():
    assert choose_batch_size(1, 300, COST, **BOUNDS).size == 1
    c = choose_batch_size(7, 300, COST, **BOUNDS)
    assert (c.size, c.bound) == (7, "available")
    assert choose_batch_size(0, 300, COST, **BOUNDS).size == 0
    assert (
        choose_batch_size(100, 300, COST, free_capacity=0, max_items=9, max_bytes=99).size == 0
    )


def test_small_numerous_items_travel_in_large_batches():
    c = choose_batch_size(1_000_000, 200, COST, **BOUNDS)
    assert (c.size, c.bound) == (512, "max_items")


def test_large_items_travel_alone():
    c = choose_batch_size(1_000, 700_000, COST, **BOUNDS)
    assert (c.size, c.bound) == (1, "max_bytes")
    # Not over the byte bound, but each item costs far more than a call's overhead:
    # with the queue spread over calls, nothing is gained by grouping them.
    slow = CallCost(overhead_s=1e-3, per_item_s=0.5)
    c = choose_batch_size(100, 1_000, slow, **BOUNDS, target_batches_in_flight=100)
    assert c.size == 1


def test_amortization_sets_the_floor_when_spreading_a_deep_queue():
    # overhead 2 ms, 20.2 us per 200-byte item: 90% of a call must be work, so a batch
    # needs ceil(2e-3 * 0.9 / (0.1 * 20.2e-6)) = 892 items; capped by max_items.
    c = choose_batch_size(
        5_000,
        200,
        COST,
        free_capacity=5_000,
        max_items=10_000,
        max_bytes=1 << 30,
        target_batches_in_flight=50,
    )
    assert (c.size, c.bound) == (892, "amortize")
    c = choose_batch_size(
        100_000,
        200,
        COST,
        free_capacity=100_000,
        max_items=10_000,
        max_bytes=1 << 30,
        target_batches_in_flight=50,
    )
    assert (c.size, c.bound) == (2_000, "spread")


def test_call_time_bound():
    c = choose_batch_size(10_000, 200, COST, **BOUNDS, max_call_s=0.004)
    assert c.bound == "max_call_s" and COST.seconds(c.size, 200) <= 0.004
    assert COST.seconds(c.size + 1, 200) > 0.004


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_overhead_share"):
        choose_batch_size(1, 1, COST, **BOUNDS, max_overhead_share=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        CallCost(-1, 0)


def test_estimator_recovers_the_cost_from_noisy_calls():
    rng = random.Random(3)
    est = CallCostEstimator(prior=CallCost(1e-3, 1e-5), forget=0.999)
    assert est.estimate() == est.prior  # too few calls yet
    for _ in range(500):
        n = rng.randint(1, 500)
        size = rng.choice([100, 1_000, 10_000])
        est.observe(n, n * size, COST.seconds(n, size) * rng.uniform(0.98, 1.02))
    got = est.estimate()
    assert got.overhead_s == pytest.approx(COST.overhead_s, rel=0.1)
    assert got.per_item_s == pytest.approx(COST.per_item_s, rel=0.1)
    assert got.per_byte_s == pytest.approx(COST.per_byte_s, rel=0.1)


def test_estimator_stays_defined_when_items_and_bytes_move_together():
    est = CallCostEstimator(prior=CallCost(1e-3, 1e-5, 1e-9), min_calls=2)
    for n in (1, 10, 100, 50, 5):
        est.observe(n, n * 300, 2e-3 + n * 3e-5)
    got = est.estimate()
    # Items and bytes are collinear: only the total per-item cost is identified.
    assert got.overhead_s == pytest.approx(2e-3, rel=0.05)
    assert got.per_item_s + 300 * got.per_byte_s == pytest.approx(3e-5, rel=0.05)
