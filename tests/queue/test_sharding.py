"""Sharding helpers: stable placement, minimal movement on resize, balance measures."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from fleet.policy.sharding import (
    consumer_shard_order,
    jump_hash,
    pick_shard,
    queue_id,
    shard_balance,
    shard_for_key,
    stable_hash64,
)


def test_hash_is_stable_across_processes():
    code = (
        "from fleet.policy.sharding import shard_for_key as s; print(s('support', 'k42', 16))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert int(other) == shard_for_key("support", "k42", 16)
    assert stable_hash64("abc") == stable_hash64("abc") != stable_hash64("abd")


def test_growing_shards_moves_about_one_in_n_plus_one_keys():
    keys = [f"user-{i}" for i in range(20_000)]
    before = [shard_for_key("q", k, 10) for k in keys]
    after = [shard_for_key("q", k, 11) for k in keys]
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert all(b == 10 for _, b in moved)  # keys only move to the new shard
    assert abs(len(moved) / len(keys) - 1 / 11) < 0.01


def test_hundred_specialized_queues_are_balanced_by_key():
    """100 capability queues x 8 shards; 200,000 keyed tasks spread evenly."""
    rng = random.Random(7)
    depths = {f"cap{c}": [0] * 8 for c in range(100)}
    for i in range(200_000):
        q = f"cap{rng.randrange(100)}"
        depths[q][shard_for_key(q, f"key-{i}", 8)] += 1
    worst = max(shard_balance(d).max_over_mean for d in depths.values())
    assert worst < 1.25  # ~250 per shard: within a few binomial standard deviations


def test_power_of_two_choices_keeps_unkeyed_shards_level():
    rng = random.Random(1)
    depths = [0] * 16
    for _ in range(16_000):
        depths[pick_shard(16, rng, depths)] += 1
    b = shard_balance(depths)
    assert b.total == 16_000 and b.max - b.min <= 3 and b.cv < 0.01
    assert pick_shard(4, rng, key="k", queue="q") == shard_for_key("q", "k", 4)
    assert pick_shard(1, rng, [5]) == 0


def test_consumers_start_on_different_shards():
    starts = {consumer_shard_order(f"dispatcher-{i}", 8)[0] for i in range(32)}
    assert len(starts) >= 6
    order = consumer_shard_order("x", 5)
    assert sorted(order) == list(range(5))


def test_balance_measures():
    b = shard_balance([10, 10, 10, 10])
    assert (b.max_over_mean, b.cv) == (1.0, 0.0)
    b = shard_balance([40, 0, 0, 0])
    assert b.max_over_mean == 4.0 and b.cv == pytest.approx(3**0.5)
    assert shard_balance([]).shards == 0 and shard_balance([0, 0]).max_over_mean == 0.0


def test_queue_ids_and_bad_input():
    assert queue_id("support") == "support" and queue_id("support", "eu") == "support@eu"
    with pytest.raises(ValueError, match="must not contain"):
        queue_id("a@b")
    with pytest.raises(ValueError, match="shards"):
        pick_shard(0, random.Random())
    with pytest.raises(ValueError, match="depths has 2 entries for 3 shards"):
        pick_shard(3, random.Random(), [1, 2])
    with pytest.raises(ValueError, match="buckets"):
        jump_hash(1, 0)
