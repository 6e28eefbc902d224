"""Admission control's rule (``fleet.policy.admission``) on a virtual clock."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fleet.policy.admission import (
    DEADLINE_EXCEEDED,
    LEVELS,
    SHED,
    UNAVAILABLE,
    UNMEASURED_RETRY_AFTER_S,
    UNREACHABLE,
    Admission,
    AdmissionRule,
    LoadEstimator,
    PoolLoad,
    ShedDemand,
    counts_as_demand,
)
from fleet.spec.admission import AdmissionSpec
from fleet.spec.budgets import BudgetsSpec, PriorityClass
from tests.utils import FakeClock

CLASSES = [
    PriorityClass(name="high", min_task_priority=7, shed_wait_share=1.0),
    PriorityClass(name="normal", min_task_priority=4, shed_wait_share=0.8),
    PriorityClass(name="low", min_task_priority=0, shed_wait_share=0.5),
]
RULE = AdmissionRule.of(
    AdmissionSpec(enabled=True, max_queue_wait_s=5.0), BudgetsSpec(priority_classes=CLASSES)
)


def load(
    clock: FakeClock,
    pending: dict[int, int],
    drain: float | None = 100.0,
    arrivals: dict[int, float] | None = None,
    by_priority: bool = True,
    rule: AdmissionRule = RULE,
    down: bool = False,
    slots: int = 1,
    never_done: bool = False,
) -> PoolLoad:
    return PoolLoad(
        rule=rule,
        taken_unix_s=clock(),
        pending=tuple(pending.get(p, 0) for p in range(LEVELS)),
        drain_per_s=drain,
        arrivals_per_s=tuple((arrivals or {}).get(p, 0.0) for p in range(LEVELS)),
        by_priority=by_priority,
        slots=slots,
        down=down,
        never_done=never_done,
    )


def gate(clock: FakeClock, **kw) -> Admission:
    adm = Admission(clock)
    adm.update({"work": load(clock, **kw)})
    return adm


def test_classes_map_priorities_highest_first():
    assert [RULE.classes[p][0] for p in range(LEVELS)] == (
        ["low"] * 4 + ["normal"] * 3 + ["high"] * 3
    )


def test_without_a_view_or_with_the_rule_off_everything_is_admitted():
    clock = FakeClock()
    assert Admission(clock).decide("work", 0).admitted
    off = AdmissionRule.of(AdmissionSpec(), BudgetsSpec(priority_classes=CLASSES))
    adm = gate(clock, pending={0: 10**6}, rule=off)
    assert not adm.enabled
    assert adm.decide("work", 0).admitted


def test_the_wait_counts_only_work_at_or_above_the_tasks_priority():
    clock = FakeClock()
    adm = gate(clock, pending={2: 400, 8: 10})
    high = adm.decide("work", 8)
    assert high.admitted and high.wait_s == pytest.approx((10 + 1) / 100)
    # priority 2 (low, share 0.5): 410 ahead at 100/s is 4.1 s, over 0.5 * 5 s
    low = adm.decide("work", 2)
    assert not low.admitted and low.reason == SHED
    # what is ahead (the high task just admitted too), then itself
    assert low.wait_s == pytest.approx((400 + 10 + 1 + 1) / 100)
    assert low.retry_after_s == pytest.approx(low.wait_s - 2.5)


def test_higher_priorities_arriving_slow_the_drain_of_lower_ones():
    clock = FakeClock()
    adm = gate(clock, pending={5: 100}, arrivals={8: 60.0, 5: 500.0})
    v = adm.decide("work", 5)
    # the 60/s of priority 8 will overtake it: what is ahead drains at 100 - 60 =
    # 40/s, then it takes its own turn (one slot: 1 / 100 s)
    assert v.wait_s == pytest.approx(100 / 40 + 1 / 100)
    assert v.admitted  # 2.5 s <= 0.8 * 5 s
    # a pool whose higher priorities take all it drains never admits below them
    adm = gate(clock, pending={0: 1}, arrivals={9: 100.0})
    v = adm.decide("work", 0)
    assert not v.admitted and math.isinf(v.wait_s)


def test_a_fifo_queue_puts_everything_pending_ahead_of_every_task():
    clock = FakeClock()
    adm = gate(clock, pending={0: 450}, arrivals={0: 1000.0}, by_priority=False)
    v = adm.decide("work", 9)
    assert v.wait_s == pytest.approx(451 / 100)  # arrivals overtake nothing in FIFO
    assert v.admitted
    assert not adm.decide("work", 0).admitted  # 4.51 s > 2.5 s for the low class


def test_admissions_count_until_the_limit_then_shed():
    clock = FakeClock()
    adm = gate(clock, pending={9: 100})
    verdicts = [adm.decide("work", 9) for _ in range(1_000)]
    admitted = sum(v.admitted for v in verdicts)
    # 5 s at 100/s is 500 tasks, 100 of them already pending
    assert admitted == 5 * 100 - 100
    assert all(v.admitted for v in verdicts[:admitted])
    assert not any(v.admitted for v in verdicts[admitted:])


def test_the_view_drains_as_time_passes():
    clock = FakeClock()
    adm = gate(clock, pending={9: 600})
    assert not adm.decide("work", 9).admitted  # 6 s ahead
    clock.advance(2.0)  # 200 drained since the view was taken
    v = adm.decide("work", 9)
    assert v.admitted and v.wait_s == pytest.approx(401 / 100)


def test_a_deadline_limits_the_wait_by_the_class_share_of_the_time_left():
    clock = FakeClock()
    adm = gate(clock, pending={9: 150})
    assert adm.decide("work", 9, deadline_unix_s=clock() + 2.0).admitted  # 1.51 <= 2
    # share 1 and a wait over the time left: it would miss its deadline whenever it
    # came back, so the refusal says so and asks for no retry
    v = adm.decide("work", 9, deadline_unix_s=clock() + 1.0)
    assert (v.admitted, v.reason, v.retry_after_s) == (False, DEADLINE_EXCEEDED, 0.0)
    late = adm.decide("work", 9, deadline_unix_s=clock() - 0.1)
    assert (late.admitted, late.reason) == (False, DEADLINE_EXCEEDED)
    # Both answer deadline_exceeded, but only the one whose deadline had not passed is
    # counted as demand for agents (a bigger pool would have made its deadline).
    assert adm.take_counts() == {
        ("work", 9, UNREACHABLE, "none"): 1,
        ("work", 9, DEADLINE_EXCEEDED, "none"): 1,
    }
    assert counts_as_demand(UNREACHABLE) and counts_as_demand(SHED)
    assert counts_as_demand(UNAVAILABLE) and not counts_as_demand(DEADLINE_EXCEEDED)
    assert not counts_as_demand("bulkhead")


def test_shed_demand_is_smoothed_over_ticks():
    demand = ShedDemand()
    assert [demand.take(n) for n in (100, 0, 0, 100)] == [50, 25, 12, 56]


def test_a_refusal_under_a_deadline_says_when_a_retry_would_be_admitted():
    clock = FakeClock()
    adm = gate(clock, pending={5: 300})
    # normal class (share 0.8): wait 3.01 s against 0.8 x 3.5 s left. Waiting t lowers
    # the wait by t and the limit by 0.8 t: t = (3.01 - 2.8) / (1 - 0.8)
    v = adm.decide("work", 5, deadline_unix_s=clock() + 3.5)
    assert (v.admitted, v.reason) == (False, SHED)
    assert v.retry_after_s == pytest.approx((3.01 - 0.8 * 3.5) / 0.2)
    clock.advance(v.retry_after_s + 1e-6)  # and then it is admitted (on the same view)
    assert adm.decide("work", 5, deadline_unix_s=clock() + 3.5 - v.retry_after_s).admitted


def test_a_pool_with_free_slots_predicts_one_tasks_time():
    clock = FakeClock()
    # 10 slots draining 100/s: a task takes 0.1 s; 5 ahead leave slots free
    adm = gate(clock, pending={9: 5}, slots=10)
    assert adm.decide("work", 9).wait_s == pytest.approx(0.1)
    # a task's deadline shorter than one task's time cannot be met
    v = adm.decide("work", 9, deadline_unix_s=clock() + 0.05)
    assert (v.admitted, v.reason) == (False, DEADLINE_EXCEEDED)


def test_a_stale_view_admits_and_a_down_pool_refuses_as_unavailable():
    clock = FakeClock()
    adm = gate(clock, pending={0: 10**6})
    clock.advance(RULE.stale_after_s + 0.1)
    assert adm.decide("work", 0).admitted
    adm = gate(clock, pending={}, down=True)
    v = adm.decide("work", 9)
    assert (v.admitted, v.reason) == (False, UNAVAILABLE) and v.retry_after_s >= 1


def test_a_pool_with_no_measured_rate_admits_two_rounds_of_its_slots():
    # An idle fallback or a new pool cannot predict a wait: below the highest class it
    # admits what two rounds of its slots would run, at or above the task's priority,
    # and sheds the rest briefly.
    clock = FakeClock()
    new = {"drain": None, "never_done": True}
    adm = gate(clock, pending={5: 3}, slots=10, **new)
    assert [adm.decide("work", 5).admitted for _ in range(18)] == [True] * 17 + [False]
    v = adm.decide("work", 5)
    assert (v.reason, v.retry_after_s) == (SHED, UNMEASURED_RETRY_AFTER_S)
    assert adm.decide("work", 6).admitted  # a higher priority: nothing is ahead of it
    assert not gate(clock, pending={0: 10**6}, **new).decide("work", 0).admitted
    # The highest class is shed last: not on a guess.
    assert gate(clock, pending={9: 10**6}, **new).decide("work", 7).admitted
    assert gate(clock, pending={}, slots=0, **new).decide("work", 0).admitted
    # A pool that finished tasks before (a restarted controller has no rate yet) is
    # not a pool nobody measured: it admits, as the controller restarting must not
    # close the door.
    assert gate(clock, pending={0: 10**6}, drain=None).decide("work", 0).admitted


def test_refusals_are_counted_by_tenant():
    clock = FakeClock()
    adm = gate(clock, pending={9: 10**6})
    adm.decide("work", 1, tenant="acme")
    adm.decide("work", 1, tenant=lambda: "acme")
    adm.decide("work", 8, tenant="none")
    assert adm.take_counts() == {
        ("work", 1, SHED, "acme"): 2,
        ("work", 8, SHED, "none"): 1,
    }
    assert adm.take_counts() == {}


def test_the_estimator_measures_capacity_by_littles_law():
    est = LoadEstimator()
    pending = [0] * LEVELS
    adm = [0] * LEVELS

    def obs(t: float, done: int, busy_slot_s: float, capacity: int, admitted: int = 0):
        adm[5] = admitted
        return est.observe(RULE, t, t, pending, adm, done, busy_slot_s, capacity, True)

    assert obs(0.0, 0, 0.0, 100).drain_per_s is None  # the first tick measures nothing
    # 500 done with 25 slot-seconds busy: 0.05 s a task, so 100 slots do 2,000/s
    # (however few of them were busy)
    first = obs(1.0, 500, 25.0, 100, admitted=400)
    assert first.drain_per_s == pytest.approx(2_000.0)
    assert first.arrivals_per_s[5] == pytest.approx(400.0)
    assert first.slots == 100
    # an idle interval, and a restarted shard (its total went back), keep the estimate
    assert obs(2.0, 500, 25.0, 100, admitted=400).drain_per_s == pytest.approx(2_000.0)
    assert obs(3.0, 10, 125.0, 100, admitted=400).drain_per_s == pytest.approx(2_000.0)
    # a saturated pool completing 600/s: the estimate moves halfway (EWMA)
    assert obs(4.0, 610, 225.0, 100, admitted=400).drain_per_s == pytest.approx(1_300.0)


def test_long_tasks_are_measured_over_intervals_and_a_stall_brings_the_estimate_down():
    est = LoadEstimator()
    zeros = [0] * LEVELS

    def obs(t: float, done: int, busy: float) -> float | None:
        return est.observe(RULE, t, t, zeros, zeros, done, busy, 10, True).drain_per_s

    obs(0.0, 0, 0.0)
    # 10 slots of 4 s tasks: nothing completes in the first second (busy 10 slot-s)...
    assert obs(1.0, 0, 10.0) is None
    # ... 10 complete by the end of the fourth: 10 done in 40 slot-seconds
    assert obs(4.0, 10, 40.0) == pytest.approx(10 * 10 / 40)
    # then nothing completes for a while: below 5 tasks' worth of slot-seconds (5 x
    # 4 slot-s = 20, two seconds of 10 busy slots) the estimate holds...
    assert obs(5.0, 10, 50.0) == pytest.approx(2.5)
    assert obs(6.0, 10, 60.0) == pytest.approx(2.5)
    # ... past it, it falls towards capacity / busy (as if one task were completing)
    falling = [obs(6.0 + k, 10, 60.0 + 10 * k) for k in range(1, 6)]
    assert falling == sorted(falling, reverse=True) and falling[-1] < 1.0


def test_an_entry_points_admissions_count_for_all_by_its_share():
    from fleet.policy.admission import EntryShares

    shares = EntryShares(horizon_s=3.0)
    assert shares.report("a", 0, 0.0) == 1.0  # nothing admitted lately: counts once
    assert shares.report("b", 0, 0.0) == 1.0
    assert shares.report("a", 300, 1.0) == pytest.approx(1.0)  # only a admits
    assert shares.report("b", 100, 1.0) == pytest.approx((0.5 * 100) / (0.5 * 100 + 0.5 * 300))
    assert shares.report("a", 300, 5.0) == 1.0  # b not heard from within 3 s: gone
    # At a share of 1/2 every admission here counts twice against the limit.
    clock = FakeClock()
    adm = Admission(clock)
    adm.update({"work": load(clock, pending={9: 100})}, {"work": 0.5})
    admitted = sum(adm.decide("work", 9).admitted for _ in range(1_000))
    assert admitted == (5 * 100 - 100) // 2


def test_a_new_view_keeps_the_admissions_it_does_not_hold_yet():
    clock = FakeClock()
    adm = Admission(clock)
    first = load(clock, pending={9: 100})
    adm.update({"work": first})
    assert sum(adm.decide("work", 9).admitted for _ in range(300)) == 300
    # The same figures again (the controller has not ticked): the 300 still count.
    adm.update({"work": first})
    assert sum(adm.decide("work", 9).admitted for _ in range(1_000)) == 100
    # A view taken after 50 of them were admitted holds those 50; the rest carry over.
    clock.advance(1.0)
    adm2 = Admission(clock)
    adm2.update({"work": load(clock, pending={9: 100})})
    for _ in range(50):
        adm2.decide("work", 9)
    taken = clock()
    clock.advance(0.5)
    for _ in range(30):
        adm2.decide("work", 9)
    newer = dataclasses.replace(load(clock, pending={9: 150}), taken_unix_s=taken + 0.25)
    adm2.update({"work": newer})
    # ahead: 150 pending + 30 admitted since, less 0.25 s drained at 100/s
    assert adm2.decide("work", 9).wait_s == pytest.approx((150 + 30 - 25) / 100 + 0.01)


def test_a_withdrawn_admission_no_longer_counts_ahead_of_later_tasks():
    clock = FakeClock()
    adm = gate(clock, pending={9: 100})
    for _ in range(400):  # up to the limit: 500 tasks of 5 s at 100/s
        assert adm.decide("work", 9).admitted
    assert not adm.decide("work", 9, count=False).admitted
    for _ in range(50):  # refused after admission (a tenant's bulkhead): taken back
        adm.withdraw("work", 9)
    verdicts = [adm.decide("work", 9) for _ in range(60)]
    assert sum(v.admitted for v in verdicts) == 50
    # Where decide admits without counting (the rule off), withdraw takes nothing back.
    off = Admission(clock)
    off.update(
        {"work": load(clock, pending={9: 100}, rule=dataclasses.replace(RULE, enabled=False))}
    )
    off.withdraw("work", 9)
    assert off.decide("work", 9).admitted
