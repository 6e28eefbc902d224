"""Allocators: unit cases and hypothesis properties (sum within the total, minimums when
the total allows, never above the maximum, weights respected, dynamic = max-min fair)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fleet.policy.allocation import (
    Allocator,
    Claim,
    Policy,
    Preemption,
    allocate,
)

REL = 1e-7


def close(a: float, b: float, scale: float = 1.0) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b), scale)


# --- unit cases ------------------------------------------------------------------------


def test_equal_splits_evenly_and_respects_caps():
    a = allocate(90, [Claim("a"), Claim("b"), Claim("c", max=10)], Policy.EQUAL)
    assert a.shares == pytest.approx({"a": 40, "b": 40, "c": 10})


def test_weighted_and_resource_follow_weight_and_size():
    claims = [Claim("a", weight=1, size=4), Claim("b", weight=3, size=1)]
    assert allocate(100, claims, Policy.WEIGHTED).shares == pytest.approx({"a": 25, "b": 75})
    assert allocate(100, claims, Policy.RESOURCE).shares == pytest.approx({"a": 80, "b": 20})


def test_dynamic_water_fills_demands():
    claims = [Claim("small", demand=10), Claim("mid", demand=30), Claim("big", demand=500)]
    a = allocate(100, claims, Policy.DYNAMIC)
    assert a.shares == pytest.approx({"small": 10, "mid": 30, "big": 60})
    assert a.below_cap == {"big"}
    under = allocate(1_000, claims, Policy.DYNAMIC)
    assert under.shares == pytest.approx({"small": 10, "mid": 30, "big": 500})
    assert under.unallocated == pytest.approx(460), "dynamic leaves unclaimed budget free"


def test_minimums_come_first_and_high_priority_first_under_overload():
    claims = [Claim(f"h{i}", min=50, max=500, priority=2) for i in range(2)] + [
        Claim(f"l{i}", min=50, max=500, priority=0) for i in range(4)
    ]
    a = allocate(250, claims, Policy.EQUAL)
    assert [a.shares[f"h{i}"] for i in range(2)] == [50, 50]
    assert sum(a.shares[f"l{i}"] for i in range(4)) == pytest.approx(150)
    assert a.below_min == {f"l{i}" for i in range(4)}
    b = allocate(1_300, claims, Policy.EQUAL)  # mins covered; the surplus goes high first
    assert b.shares["h0"] == b.shares["h1"] == 500
    assert all(b.shares[f"l{i}"] == pytest.approx(75) for i in range(4))


def test_weighted_preemption_shares_surplus_across_classes_by_weight():
    claims = [Claim("h", priority=2, weight=3), Claim("l", priority=0, weight=1)]
    a = allocate(100, claims, Policy.WEIGHTED, Preemption.WEIGHTED)
    assert a.shares == pytest.approx({"h": 75, "l": 25})
    s = allocate(100, claims, Policy.WEIGHTED, Preemption.STRICT)
    assert s.shares == pytest.approx({"h": 100, "l": 0})


def test_used_is_never_taken_back():
    claims = [Claim("early", min=50, max=500, used=400), Claim("late", min=50, max=500)]
    a = allocate(420, claims, Policy.EQUAL)
    assert a.shares["early"] == 400 and a.shares["late"] == pytest.approx(20)
    with pytest.raises(ValueError, match=r"already used 400\.0 > total 300"):
        allocate(300, claims)


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"min": 5, "max": 1}, "min 5 > max 1"),
        ({"weight": 0}, "weight 0"),
        ({"min": -1}, "min -1"),
        ({"used": math.nan}, "used nan"),
    ],
)
def test_bad_claims_are_rejected(bad, needle):
    with pytest.raises(ValueError, match=needle):
        Claim("x", **bad)


def test_allocator_recomputes_when_agents_join_and_leave():
    alloc = Allocator(120, Policy.DYNAMIC)
    for name in ("a", "b", "c"):
        alloc.join(Claim(name, max=100))
    assert alloc.share("a") == pytest.approx(40)
    first = alloc.allocation()
    assert alloc.allocation() is first, "no change, no recompute"
    alloc.leave("c")
    assert alloc.share("a") == pytest.approx(60)
    alloc.update_fields("b", demand=10)
    assert alloc.share("a") == pytest.approx(100) and alloc.share("b") == pytest.approx(10)
    alloc.join(Claim("d", max=100))
    alloc.set_total(60)
    assert alloc.allocation().allocated <= 60


# --- properties ------------------------------------------------------------------------

amount = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def claims_strategy(draw, with_used: bool = False, priorities: int = 3):
    n = draw(st.integers(1, 25))
    out = []
    for i in range(n):
        lo = draw(st.floats(0, 1e4))
        hi = lo + draw(st.one_of(st.floats(0, 1e5), st.just(math.inf)))
        out.append(
            Claim(
                f"a{i}",
                min=lo,
                max=hi,
                weight=draw(st.floats(0.01, 100)),
                size=draw(st.floats(0.01, 100)),
                demand=draw(st.one_of(st.none(), st.floats(0, 2e5))),
                priority=draw(st.integers(0, priorities - 1)),
                used=draw(st.floats(0, lo + (0 if hi == math.inf else hi - lo)))
                if with_used
                else 0.0,
            )
        )
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=claims_strategy(with_used=True),
    total=amount,
    policy=st.sampled_from(Policy),
    preemption=st.sampled_from(Preemption),
)
def test_sum_never_exceeds_total_and_bounds_hold(claims, total, policy, preemption):
    assume(math.fsum(c.used for c in claims) <= total)
    a = allocate(total, claims, policy, preemption)
    assert math.fsum(a.shares.values()) <= total  # exactly, not approximately
    mins_fit = math.fsum(max(c.min, c.used) for c in claims) <= total
    for c in claims:
        x = a.shares[c.agent_id]
        assert x >= c.used
        assert x <= c.max
        if mins_fit:
            assert x >= c.min, (c, x)


def _levels_ok(shares, slots_bounds, weights, scale):
    """Weighted max-min optimality: every agent not at its cap has a normalized share at
    least that of every agent above its floor."""
    not_capped = [k for k, (lo, hi) in slots_bounds.items() if shares[k] < hi - REL * scale]
    above_floor = [k for k, (lo, hi) in slots_bounds.items() if shares[k] > lo + REL * scale]
    for i in not_capped:
        for j in above_floor:
            li, lj = shares[i] / weights[i], shares[j] / weights[j]
            assert lj <= li + REL * max(1.0, li, lj, scale), (i, j, li, lj)


@settings(max_examples=150, deadline=None)
@given(
    claims=claims_strategy(priorities=1),
    total=amount,
    policy=st.sampled_from([Policy.WEIGHTED, Policy.RESOURCE, Policy.DYNAMIC]),
)
def test_weights_respected_and_allocation_is_max_min_fair(claims, total, policy):
    assume(math.fsum(c.min for c in claims) <= total)
    a = allocate(total, claims, policy)
    weight = {c.agent_id: (c.size if policy is Policy.RESOURCE else c.weight) for c in claims}
    bounds = {}
    for c in claims:
        hi = c.max
        if policy is Policy.DYNAMIC and c.demand is not None:
            hi = min(c.max, max(c.min, c.demand))
        bounds[c.agent_id] = (c.min, hi)
    _levels_ok(a.shares, bounds, weight, total)
    # Work-conserving: everything is handed out up to the caps.
    want = min(total, math.fsum(hi for _, hi in bounds.values()))
    assert close(a.allocated, want, total)
    # Agents strictly inside their bounds all sit at the same level (weights respected).
    inside = [
        k
        for k, (lo, hi) in bounds.items()
        if lo + REL * total < a.shares[k] < hi - REL * total
    ]
    levels = [a.shares[k] / weight[k] for k in inside]
    if levels:
        assert max(levels) - min(levels) <= REL * max(1.0, max(levels), total)


def progressive_filling(total: float, caps: dict[str, float], weights: dict[str, float]):
    """Reference max-min fair allocation (no minimums): repeatedly split what is left
    among the unsaturated agents by weight, saturating those that reach their cap."""
    x = dict.fromkeys(caps, 0.0)
    active = set(caps)
    left = total
    while active and left > 1e-12 * max(1.0, total):
        wsum = sum(weights[k] for k in active)
        level = left / wsum
        room = {k: (caps[k] - x[k]) / weights[k] for k in active}
        step = min(level, min(room.values()))
        for k in list(active):
            x[k] += step * weights[k]
            if room[k] <= step:
                x[k] = caps[k]
                active.discard(k)
        left = total - sum(x.values())
    return x


@settings(max_examples=300, deadline=None)
@given(
    demands=st.lists(st.floats(0, 1e4), min_size=1, max_size=30),
    weights=st.lists(st.floats(0.1, 10), min_size=30, max_size=30),
    total=st.floats(0, 2e5),
)
def test_dynamic_matches_progressive_filling(demands, weights, total):
    claims = [Claim(f"a{i}", demand=d, weight=weights[i]) for i, d in enumerate(demands)]
    got = allocate(total, claims, Policy.DYNAMIC).shares
    ref = progressive_filling(
        total, {c.agent_id: c.demand for c in claims}, {c.agent_id: c.weight for c in claims}
    )
    for k in got:
        assert abs(got[k] - ref[k]) <= 1e-6 * max(1.0, total), (k, got[k], ref[k])


@settings(max_examples=150, deadline=None)
@given(claims=claims_strategy(priorities=3), total=amount, policy=st.sampled_from(Policy))
def test_strict_preemption_gives_lower_classes_surplus_only_when_higher_are_full(
    claims, total, policy
):
    a = allocate(total, claims, policy, Preemption.STRICT)
    for hi_c in claims:
        if hi_c.agent_id not in a.below_cap:
            continue
        for lo_c in claims:
            if lo_c.priority < hi_c.priority:
                # A lower class gets nothing beyond its minimum while a higher one wants more.
                assert a.shares[lo_c.agent_id] <= lo_c.min + REL * max(1.0, total)


@settings(max_examples=100, deadline=None)
@given(claims=claims_strategy(), total=amount, leave=st.integers(0, 24))
def test_leaving_never_shrinks_the_others(claims, total, leave):
    """With equal priority, an agent leaving only frees room (population monotonicity)."""
    claims = [
        Claim(c.agent_id, min=c.min, max=c.max, weight=c.weight, demand=c.demand)
        for c in claims
    ]
    assume(math.fsum(c.min for c in claims) <= total and len(claims) > 1)
    alloc = Allocator(total, Policy.DYNAMIC)
    for c in claims:
        alloc.join(c)
    before = dict(alloc.allocation().shares)
    gone = claims[leave % len(claims)].agent_id
    alloc.leave(gone)
    after = alloc.allocation().shares
    assert gone not in after
    for k, v in after.items():
        assert v >= before[k] - REL * max(1.0, total)
