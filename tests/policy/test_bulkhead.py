"""Bulkheads' shares (``fleet.policy.bulkhead``): what each queue shard enforces."""

from __future__ import annotations

import pytest

from fleet.policy.bulkhead import ShardBulkhead, held_back, pool_max_in_flight, shard_share
from fleet.spec.bulkheads import BulkheadsSpec


@pytest.mark.parametrize(
    ("limit", "shards"),
    # a limit is at least the shard count (the spec refuses less)
    [(n, k) for n in (1, 2, 3, 7, 8, 100, 101) for k in (1, 2, 3, 8) if n >= k],
)
def test_the_shards_shares_add_up_to_the_limit_and_differ_by_at_most_one(limit, shards):
    shares = [shard_share(limit, shards, i) for i in range(shards)]
    assert sum(shares) == limit
    assert max(shares) - min(shares) <= 1 and min(shares) >= 1


def test_no_limit_stays_none_and_a_bad_index_is_named():
    assert shard_share(None, 4, 3) is None
    with pytest.raises(ValueError, match=r"shard index 4 is not in 0\.\.3"):
        shard_share(10, 4, 4)


def test_a_shard_takes_its_share_of_the_pool_every_tenant_and_named_tenants():
    spec = BulkheadsSpec.model_validate(
        {
            "pools": {"work": {"max_queued": 101, "max_in_flight": 9}},
            "tenant": {"max_queued": 10, "max_in_flight": 4},
            "tenants": {"big": {"max_queued": 1_000}},
        }
    )
    first, last = (ShardBulkhead.of(spec, "work", 2, i) for i in (0, 1))
    assert (first.max_queued, last.max_queued) == (51, 50)
    assert first.queued_limit("anyone") == 5 and first.in_flight_limit("anyone") == 2
    assert first.queued_limit("big") == 500 and first.in_flight_limit("big") is None
    assert first.limits_tenants
    assert ShardBulkhead.from_json(first.to_json()) == first
    other = ShardBulkhead.of(spec, "other", 2, 0)
    assert other.max_queued is None and other.queued_limit("x") == 5
    assert pool_max_in_flight(spec, "work") == 9 and pool_max_in_flight(spec, "other") is None
    assert not ShardBulkhead.of(BulkheadsSpec(), "work", 2, 0).limits_tenants


def test_held_back_keeps_what_a_tenants_room_cannot_take_highest_priorities_first():
    limits = {"a": 3, "b": 10}
    ready = {"a": [4, 0, 0, 0, 0, 2, 0, 0, 0, 0], "b": [0] * 9 + [5]}
    # a: 1 in flight of 3, room 2: both priority-5 tasks run, the four at 0 are held
    # back; b has room for all of its ready tasks.
    out = held_back(ready, {"a": 1, "b": 2}, limits.get)
    assert out == [4] + [0] * 9
    # a tenant over its limit (a limit lowered by `fleet apply`) runs none of them
    assert held_back(ready, {"a": 5}, limits.get) == [4, 0, 0, 0, 0, 2, 0, 0, 0, 0]
    assert held_back({}, {"a": 5}, limits.get) == [0] * 10
