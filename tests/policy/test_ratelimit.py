"""Token buckets per tenant, on a virtual clock."""

from __future__ import annotations

import pytest

from fleet.policy.ratelimit import TenantBuckets, TokenBucket
from tests.utils import FakeClock


def test_a_bucket_grants_its_burst_then_its_rate():
    b = TokenBucket(rate_per_s=10, burst=5, now=0.0)
    assert b.take(3, 0.0) == 3 and b.take(3, 0.0) == 2 and b.take(1, 0.0) == 0
    assert b.wait_s(0.0) == pytest.approx(0.1)
    assert b.take(10, 0.35) == 3  # 3.5 tokens gained: whole ones only
    assert b.take(100, 100.0) == 5  # never more than the burst


def test_tenants_have_their_own_buckets_and_the_rate_holds_over_time():
    clock = FakeClock(0.0)
    tb = TenantBuckets(rate_per_s=20, burst=10, clock=clock)
    granted = 0
    for _ in range(1000):  # 10 s of asking for 4 at a time, every 10 ms
        granted += tb.take("a", 4)[0]
        clock.advance(0.01)
    assert 10 + 20 * 9.9 <= granted <= 10 + 20 * 10  # burst + rate x time, no more
    assert tb.take("b", 10) == (10, 0.0)  # b untouched by a
    got, wait = tb.take("b", 1)
    assert got == 0 and wait == pytest.approx(0.05)


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="rate_per_s"):
        TenantBuckets(0, 5, FakeClock())
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1, 0, 0.0)


def test_the_least_recently_used_tenant_is_dropped_first():
    clock = FakeClock(0.0)
    tb = TenantBuckets(rate_per_s=1, burst=1, clock=clock, max_tenants=2)
    tb.take("a", 1)
    tb.take("b", 1)
    tb.take("a", 1)  # a is used again: b is the oldest
    tb.take("c", 1)
    assert tb.take("a", 1)[0] == 0  # a kept (empty)
    assert tb.take("b", 1)[0] == 1  # b was dropped: full again
