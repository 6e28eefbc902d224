"""Circuit breakers on a virtual clock: every transition, growth of the open duration,
probes, windows, listeners; the registry's ejection cap and panic mode; the spec."""

from __future__ import annotations

import pytest

from fleet.policy.breaker import (
    BreakerEventLog,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    CountWindow,
    EventKind,
    TimeBuckets,
    TimeWindow,
)
from fleet.policy.routing import Candidate
from fleet.spec import SpecError, parse_spec
from fleet.spec.resilience import BreakerSpec, EjectionSpec, ResilienceSpec
from tests.utils import FakeClock, pool

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def breaker(clock: FakeClock, **kw) -> tuple[CircuitBreaker, BreakerEventLog]:
    spec = BreakerSpec(
        **{
            "window_calls": 10,
            "min_calls": 5,
            "open_duration_s": 10,
            "max_open_duration_s": 35,
            "half_open_probe_calls": 2,
            **kw,
        }
    )
    log = BreakerEventLog()
    return CircuitBreaker("b", spec, clock, [log]), log


def transitions(log: BreakerEventLog) -> list[tuple[str, str]]:
    return [(e.old.value, e.new.value) for e in log.events if e.kind is EventKind.TRANSITION]


def fail(b: CircuitBreaker, n: int, latency_s: float | None = None) -> None:
    for _ in range(n):
        b.record(False, latency_s)


def succeed(b: CircuitBreaker, n: int, latency_s: float | None = None) -> None:
    for _ in range(n):
        b.record(True, latency_s)


# --- windows -------------------------------------------------------------------------


def test_count_window_forgets_the_oldest_call():
    w = CountWindow(3)
    for failed in (True, True, False, False):
        w.record(0, failed, False)
    t = w.totals(0)
    assert (t.calls, t.failures) == (3, 1) and t.failure_rate == pytest.approx(1 / 3)


def test_time_buckets_drop_whole_slots_as_time_passes():
    b = TimeBuckets(window_s=10, width=2, buckets=5)  # 2 s slots
    b.add(0.5, 1, 1)
    b.add(3.0, 2)
    assert b.sums(9.9) == (3, 1)
    assert b.sums(10.5) == (2, 0)  # the [0, 2) slot left the window
    assert b.sums(14.0) == (0, 0)
    w = TimeWindow(10, buckets=5)
    w.record(0, True, True)
    assert w.totals(1).slow == 1 and w.totals(12).calls == 0


# --- the state machine -----------------------------------------------------------------


def test_closed_opens_on_failure_rate_only_after_min_calls():
    clock = FakeClock(0)
    b, log = breaker(clock, failure_rate_threshold=0.5)
    fail(b, 4)
    assert b.state is CLOSED, "4 calls < min_calls: not enough to judge"
    b.record(True)
    assert b.state is OPEN  # 4 failures of 5 calls
    assert b.try_acquire() is False
    assert transitions(log) == [("closed", "open")]
    assert "failure rate 0.80 >= 0.5 over 5 calls" in log.events[-1].reason
    assert log.events[-1].open_until_s == 10


def test_healthy_traffic_keeps_it_closed_and_failures_slide_out_of_the_window():
    clock = FakeClock(0)
    b, _ = breaker(clock, failure_rate_threshold=0.6)
    for _ in range(100):  # F S F S S: at most 50% failures in any window it judges
        for ok in (False, True, False, True, True):
            b.record(ok)
    assert b.state is CLOSED
    assert b.snapshot().failure_rate == pytest.approx(0.4)
    fail(b, 4)  # now 6 of the last 10 failed
    assert b.state is OPEN


def test_slow_calls_trip_the_slow_call_rate_threshold():
    clock = FakeClock(0)
    b, log = breaker(clock, slow_call_duration_s=2.0, slow_call_rate_threshold=0.6)
    succeed(b, 3, latency_s=0.1)
    succeed(b, 4, latency_s=5.0)  # 4 slow of 7
    assert b.state is CLOSED
    succeed(b, 2, latency_s=2.0)  # 6 slow of 9 >= 0.6 (the duration itself counts as slow)
    assert b.state is OPEN
    assert "slow-call rate" in log.events[-1].reason


def test_time_window_only_counts_recent_calls():
    clock = FakeClock(0)
    b, _ = breaker(clock, window="time", window_s=10, min_calls=4)
    fail(b, 3)
    clock.advance(11)
    fail(b, 1)
    succeed(b, 3)
    assert b.state is CLOSED  # 1 failure of 4 recent calls
    fail(b, 4)
    assert b.state is OPEN


def test_open_becomes_half_open_after_the_duration_and_probes_close_it():
    clock = FakeClock(0)
    b, log = breaker(clock)
    fail(b, 5)
    clock.advance(9.9)
    assert b.state is OPEN and not b.allows()
    b.record(True)  # an old call finishing while open is ignored
    clock.advance(0.1)
    assert b.state is HALF_OPEN
    assert b.try_acquire() and b.try_acquire()
    assert not b.try_acquire() and not b.allows(), "only half_open_probe_calls probes"
    b.record(True)
    assert b.state is HALF_OPEN
    b.record(True)
    assert b.state is CLOSED
    assert transitions(log) == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert log.events[-1].reason == "2 probe calls succeeded"
    assert b.snapshot().calls == 0, "closing starts a fresh window"


def test_a_failed_probe_reopens_with_a_growing_duration_up_to_the_cap():
    clock = FakeClock(0)
    b, log = breaker(clock, open_duration_multiplier=2.0)
    fail(b, 5)
    durations = []
    for _ in range(4):
        until = log.events[-1].open_until_s
        durations.append(until - clock())
        clock.advance(until - clock())
        assert b.try_acquire()
        b.record(False)
        assert b.state is OPEN
    assert durations == [10, 20, 35, 35]  # 10, 20, 40 -> capped at 35
    assert b.trips == 5
    # recovery: probes pass, the breaker closes, and a much later trip starts again at 10
    clock.advance(35)
    b.try_acquire(), b.try_acquire()
    succeed(b, 2)
    assert b.state is CLOSED
    clock.advance(b.spec.trip_memory_s + 1)
    fail(b, 5)
    assert b.open_until_s == clock() + 10 and b.trips == 1


def test_a_slow_probe_counts_as_a_failure():
    clock = FakeClock(0)
    b, _ = breaker(clock, slow_call_duration_s=1.0)
    fail(b, 5)
    clock.advance(10)
    assert b.try_acquire()
    b.record(True, latency_s=3.0)
    assert b.state is OPEN and b.trips == 2


def test_probes_that_never_finish_reopen_after_the_max_wait():
    clock = FakeClock(0)
    b, log = breaker(clock, half_open_max_wait_s=5)
    fail(b, 5)
    clock.advance(10)
    assert b.state is HALF_OPEN
    clock.advance(100)  # no probe taken: it waits, half-open, for traffic
    assert b.state is HALF_OPEN
    assert b.try_acquire()  # a probe goes to a hung agent...
    clock.advance(5)
    assert b.state is OPEN  # ...and the breaker gives up on it
    assert "probes unfinished after 5" in log.events[-1].reason
    assert b.trips == 2


def test_release_returns_an_unused_probe_permit():
    clock = FakeClock(0)
    b, _ = breaker(clock, half_open_probe_calls=1)
    fail(b, 5)
    clock.advance(10)
    assert b.try_acquire() and not b.try_acquire()
    b.release()
    assert b.try_acquire()


def test_force_open_reset_and_disabled():
    clock = FakeClock(0)
    b, log = breaker(clock)
    b.force_open("health check failed")
    assert b.state is OPEN and "forced: health check failed" in log.events[-1].reason
    b.reset()
    assert b.state is CLOSED and b.trips == 0
    off, _ = breaker(clock, enabled=False)
    fail(off, 50)
    assert off.state is CLOSED and off.try_acquire()


def test_every_transition_reaches_every_listener_in_order():
    clock = FakeClock(0)
    b, log = breaker(clock)
    other = BreakerEventLog()
    fail(b, 5)
    b.add_listener(other)
    clock.advance(10)
    b.try_acquire()
    b.record(False)
    clock.advance(20)
    b.try_acquire(), b.try_acquire()
    succeed(b, 2)
    expected = [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert transitions(log) == expected
    assert transitions(other) == expected[1:]  # added after the first event
    assert log.counts == {
        "transition:open": 2,
        "transition:half_open": 2,
        "transition:closed": 1,
    }
    assert [e.at_s for e in log.events] == [0, 10, 10, 30, 30]


# --- registry: ejection cap and panic mode -------------------------------------------


def registry(clock, n_agents=20, share=0.1, panic=0.5, **breaker_kw):
    spec = ResilienceSpec(
        agent_breaker=BreakerSpec(
            **{"window_calls": 10, "min_calls": 5, "open_duration_s": 10, **breaker_kw}
        ),
        ejection=EjectionSpec(max_ejected_share=share, panic_threshold=panic),
    )
    log = BreakerEventLog()
    reg = BreakerRegistry(spec, clock, [log], name="support")
    reg.sync_agents(f"a{i}" for i in range(n_agents))
    return reg, log


def test_ejection_cap_keeps_breakers_closed_beyond_the_share_and_records_it():
    clock = FakeClock(0)
    reg, log = registry(clock, n_agents=20, share=0.1)
    assert reg.max_ejected == 2
    for agent in ("a0", "a1", "a2", "a3"):
        for _ in range(8):
            reg.record(agent, False)
    assert reg.ejected == {"a0", "a1"}
    assert reg.agent("a2").state is CLOSED and reg.agent("a3").state is CLOSED
    snap = reg.snapshot()
    assert snap["denied_trips"] == 2 * 4  # calls 5..8 of a2 and a3 each wanted to open
    denied = [e for e in log.events if e.kind is EventKind.EJECTION_DENIED]
    assert [e.name for e in denied] == ["agent:a2", "agent:a3"], "one event per run"
    assert "ejection cap reached" in denied[0].reason
    # a0 recovers: room for one more, and the next failure of a2 ejects it
    clock.advance(10)
    assert reg.acquire("a0") and reg.acquire("a0") and reg.acquire("a0")
    for _ in range(3):
        reg.record("a0", True)
    assert "a0" not in reg.ejected
    reg.record("a2", False)
    assert reg.ejected == {"a1", "a2"}
    assert len(reg.ejected) <= reg.max_ejected


def test_the_cap_never_passes_under_random_failures():
    import random

    clock = FakeClock(0)
    reg, _ = registry(clock, n_agents=30, share=0.1)
    rng = random.Random(3)
    bad = {f"a{i}" for i in range(9)}
    for _ in range(5_000):
        clock.advance(0.05)
        agent = f"a{rng.randrange(30)}"
        if reg.acquire(agent):
            reg.record(agent, not (agent in bad and rng.random() < 0.7))
        assert len(reg.ejected) <= reg.max_ejected == 3


def test_small_pools_may_still_eject_one_agent():
    clock = FakeClock(0)
    reg, _ = registry(clock, n_agents=4, share=0.1, panic=0.0)
    assert reg.max_ejected == 1
    for _ in range(5):
        reg.record("a3", False)
    assert reg.ejected == {"a3"}


def test_routable_drops_open_keeps_half_open_probes_and_caller_unhealthy():
    clock = FakeClock(0)
    reg, _ = registry(clock, n_agents=5, share=1.0, panic=0.0, half_open_probe_calls=1)
    cands = [Candidate(f"a{i}", 0, 10) for i in range(5)]
    for _ in range(5):
        reg.record("a1", False)
        reg.record("a2", False)
    r = reg.routable(cands, unhealthy={"a4"})
    assert [c.id for c in r.candidates] == ["a0", "a3"] and not r.panic
    clock.advance(10)  # a1 and a2 half-open: one probe each
    assert [c.id for c in reg.routable(cands).candidates] == ["a0", "a1", "a2", "a3", "a4"]
    assert reg.acquire("a1")
    assert [c.id for c in reg.routable(cands).candidates] == ["a0", "a2", "a3", "a4"]
    assert not reg.acquire("a1")


def test_panic_mode_routes_to_every_agent_when_too_few_are_healthy():
    clock = FakeClock(0)
    reg, log = registry(clock, n_agents=10, share=1.0, panic=0.5)
    cands = [Candidate(f"a{i}", 0, 10) for i in range(10)]
    for agent in ("a0", "a1", "a2", "a3", "a4", "a5"):
        for _ in range(5):
            reg.record(agent, False)
    r = reg.routable(cands)
    assert r.panic and r.healthy == 4 and len(r.candidates) == 10
    assert reg.acquire("a0"), "in panic every agent gets traffic"
    assert [e.kind for e in log.events if e.name == "support"] == [EventKind.PANIC_START]
    assert "4 of 10 agents healthy" in log.events[-1].reason
    # recovery: probes succeed, the breakers close, panic ends
    clock.advance(10)
    for agent in ("a0", "a1", "a2", "a3", "a4", "a5"):
        for _ in range(3):
            reg.acquire(agent)
            reg.record(agent, True)
    r = reg.routable(cands)
    assert not r.panic and len(r.candidates) == 10 and reg.ejected == frozenset()
    assert [e.kind for e in log.events if e.name == "support"] == [
        EventKind.PANIC_START,
        EventKind.PANIC_END,
    ]
    assert reg.snapshot()["panics"] == 1


def test_agents_leaving_free_their_ejection_slot():
    clock = FakeClock(0)
    reg, _ = registry(clock, n_agents=10, share=0.1, panic=0.0)
    for _ in range(5):
        reg.record("a9", False)
    assert reg.ejected == {"a9"}
    reg.sync_agents(f"a{i}" for i in range(9))
    assert reg.ejected == frozenset() and reg.agents == 9


def test_dependency_breakers_are_not_capped_and_can_be_configured_per_name():
    clock = FakeClock(0)
    spec = ResilienceSpec(
        dependency_breaker=BreakerSpec(min_calls=2, window_calls=4),
        dependency_breakers={
            "llm": BreakerSpec(min_calls=3, window_calls=3, failure_rate_threshold=1.0)
        },
        ejection=EjectionSpec(max_ejected_share=0.1),
    )
    reg = BreakerRegistry(spec, clock)
    for dep in ("db", "cache", "search"):
        reg.record_dependency(dep, False)
        reg.record_dependency(dep, False)
        assert reg.dependency(dep).state is OPEN
    for _ in range(2):
        reg.record_dependency("llm", False)
    reg.record_dependency("llm", True)
    assert reg.dependency("llm").state is CLOSED
    assert reg.snapshot()["dependencies"]["db"] == "open"


# --- spec ----------------------------------------------------------------------------


def errors_of(resilience) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool()], "resilience": resilience})
    return dict(exc.value.errors)


@pytest.mark.parametrize(
    "resilience,path,needle",
    [
        (
            {"agent_breaker": {"failure_rate_threshold": 0}},
            "resilience.agent_breaker.failure_rate_threshold",
            "0.0 is outside (0, 1]",
        ),
        (
            {"agent_breaker": {"failure_rate_threshold": 1.2}},
            "resilience.agent_breaker.failure_rate_threshold",
            "1.2 is outside (0, 1]",
        ),
        (
            {"dependency_breakers": {"llm": {"slow_call_rate_threshold": -0.5}}},
            "resilience.dependency_breakers.llm.slow_call_rate_threshold",
            "outside (0, 1]",
        ),
        (
            {"ejection": {"max_ejected_share": 0}},
            "resilience.ejection.max_ejected_share",
            "outside (0, 1]",
        ),
        (
            {"ejection": {"panic_threshold": 1.5}},
            "resilience.ejection.panic_threshold",
            "outside [0, 1]",
        ),
        (
            {"agent_breaker": {"open_duration_s": 60, "max_open_duration_s": 30}},
            "resilience.agent_breaker",
            "max_open_duration_s (30.0) must be >= open_duration_s",
        ),
        (
            {"agent_breaker": {"min_calls": 50, "window_calls": 10}},
            "resilience.agent_breaker",
            "min_calls (50) must be <= window_calls (10)",
        ),
        (
            {"agent_breaker": {"window": "sliding"}},
            "resilience.agent_breaker.window",
            "'count'",
        ),
        (
            {"agent_breaker": {"treshold": 0.5}},
            "resilience.agent_breaker.treshold",
            "unknown field",
        ),
    ],
)
def test_bad_breaker_spec_names_the_field(resilience, path, needle):
    errs = errors_of(resilience)
    assert path in errs, errs
    assert needle in errs[path], errs[path]


def test_resilience_defaults_keep_the_existing_fields():
    spec = parse_spec(
        {
            "pools": [pool()],
            "resilience": {
                "task_timeout_s": 12,
                "max_deliveries": 2,
                "agent_breaker": {"window": "time", "window_s": 30, "min_calls": 50},
            },
        }
    )
    r = spec.resilience
    assert (r.task_timeout_s, r.max_deliveries) == (12, 2)
    assert r.agent_breaker.window.value == "time" and r.ejection.max_ejected_share == 0.1
    assert r.breaker_for_dependency("anything") == r.dependency_breaker


# --- the pieces together: breakers + success-rate routing + retries --------------------


def test_bad_agents_are_ejected_within_the_cap_and_readmitted_and_tasks_succeed():
    """50 agents, 5 fail half their tasks and one hangs (its tasks time out after 5 s),
    until t=120 s when they recover. 20 tasks/s for 240 s of virtual time, each
    finishing on the spot except on the hung agent. The pure policies alone must keep
    >= 99% of tasks successful (counting retries), never eject more than the cap, eject
    bad agents, and re-admit all of them after recovery."""
    import heapq
    import random

    from fleet.policy.retry import RetryPolicy
    from fleet.policy.routing import LeastLoadedRouter, RoutingHint, SuccessRateRouter
    from fleet.spec.resilience import RetrySpec
    from fleet.spec.routing import SuccessRateSpec

    clock, rng = FakeClock(0), random.Random(5)
    spec = ResilienceSpec(
        agent_breaker=BreakerSpec(
            window_calls=20,
            min_calls=6,
            failure_rate_threshold=0.3,
            slow_call_duration_s=4,
            open_duration_s=10,
            max_open_duration_s=40,
        ),
        ejection=EjectionSpec(max_ejected_share=0.1),
        retry=RetrySpec(max_attempts=4, initial_backoff_s=0.2, budget_ratio=0.2),
    )
    reg = BreakerRegistry(spec, clock)
    router = SuccessRateRouter(
        SuccessRateSpec(min_success_rate=0.8, window_s=30, min_calls=5),
        clock,
        LeastLoadedRouter(2),
    )
    retry = RetryPolicy(spec.retry, clock, random.Random(6))
    agents = [Candidate(f"a{i}", 0, 4) for i in range(50)]
    reg.sync_agents(a.id for a in agents)
    flaky, hung = {f"a{i}" for i in range(5)}, "a5"
    events: list[tuple[float, int, str, int, str | None]] = []  # (t, seq, kind, task, agent)
    seq = 0
    for task in range(4_800):
        events.append((task * 0.05, seq := seq + 1, "arrive", task, None))
    heapq.heapify(events)
    attempts: dict[int, int] = {}
    done: dict[int, bool] = {}
    max_ejected, ejected_by_60 = 0, set()
    while events:
        t, _, kind, task, agent = heapq.heappop(events)
        clock.advance(t - clock())
        recovered = t >= 120
        if kind == "finish":  # only the hung agent's tasks finish later
            a = next(c for c in agents if c.id == agent)
            a.in_flight -= 1
            reg.record(agent, False, latency_s=5.0)
            router.record_outcome(agent, False)
        else:
            attempts[task] = attempts.get(task, 0) + 1
            if attempts[task] == 1:
                retry.record_request()
            ok_set = reg.routable(agents).candidates
            i = router.choose(ok_set, rng, RoutingHint())
            assert i is not None
            a = ok_set[i]
            reg.acquire(a.id)
            if a.id == hung and not recovered:
                a.in_flight += 1
                heapq.heappush(events, (t + 5.0, seq := seq + 1, "finish", task, a.id))
                # it will time out: the retry is scheduled for after the timeout
                d = retry.decide(attempts[task], "timeout")
                if d.retry:
                    heapq.heappush(
                        events, (t + 5.0 + d.delay_s, seq := seq + 1, "arrive", task, None)
                    )
                else:
                    done[task] = False
            else:
                ok = recovered or a.id not in flaky or rng.random() < 0.5
                reg.record(a.id, ok, latency_s=0.1)
                router.record_outcome(a.id, ok)
                if ok:
                    done[task] = True
                else:
                    d = retry.decide(attempts[task], "upstream")
                    if d.retry:
                        heapq.heappush(
                            events, (t + d.delay_s, seq := seq + 1, "arrive", task, None)
                        )
                    else:
                        done[task] = False
        max_ejected = max(max_ejected, len(reg.ejected))
        if t <= 60:
            ejected_by_60 |= reg.ejected
    clock.advance(60)
    success = sum(done.values()) / 4_800
    print(
        f"success={success:.4f} max_ejected={max_ejected} "
        f"ejected_by_60={sorted(ejected_by_60)}"
        f" denied={reg.snapshot()['denied_trips']} retries={retry.budget.snapshot()}"
    )
    assert len(done) == 4_800, "every task reached an outcome"
    assert success >= 0.99
    assert max_ejected <= reg.max_ejected == 5
    assert len(ejected_by_60 & (flaky | {hung})) >= 3, "bad agents are ejected early"
    assert not ejected_by_60 - (flaky | {hung}), "no healthy agent was ejected"
    assert reg.ejected == frozenset(), "all re-admitted after they recovered"
