"""HostCore on a virtual clock, stage by stage: slots and routing, breakers, retries,
health, the watchdog, parking and the record buffers. No Ray, no event loop: every event
is a method call and every answer is asserted."""

from __future__ import annotations

import itertools
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from fleet.policy.breaker import BreakerState, CircuitBreaker
from fleet.policy.health import AgentState, FailureReason
from fleet.policy.host import BUDGET_PARK_MAX_S, HostCore, RecordBuffers, Retry, TickActions
from fleet.policy.routing import RoutingHint
from fleet.spec.health import HealthSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.spec.routing import RoutingSpec
from tests.utils import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FAST, SLOW = 0.01, 5.0  # task latencies (s)
NO_BREAKERS = {"agent_breaker": {"enabled": False}}

_keys = itertools.count()


def make_core(
    n: int = 4,
    slots: int = 1,
    *,
    routing: dict[str, Any] | None = None,
    resilience: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[HostCore, FakeClock]:
    """A core with ``n`` active agents of ``slots`` slots each, on a fake clock."""
    clock = FakeClock()
    core = HostCore(
        "pool/h",
        n,
        slots,
        RoutingSpec.model_validate(routing or {}),
        ResilienceSpec.model_validate(resilience or {}),
        HealthSpec.model_validate(health or {}),
        clock=clock,
        rng=random.Random(seed),
    )
    assert core.set_active(n) == []
    return core, clock


def start(core: HostCore, hint: RoutingHint | None = None) -> tuple[str, int]:
    """A task placed by the router and started, as the shell does: (key, agent)."""
    key = f"t{next(_keys)}"
    core.arrive(key, core.clock())
    i = core.place(hint)
    assert i is not None, "no slot for the task"
    core.start(key, i, key)
    return key, i


def begin_on(core: HostCore, i: int) -> str:
    """A task started on agent ``i`` whatever the router would pick (to feed one agent)."""
    key = f"t{next(_keys)}"
    core.arrive(key, core.clock())
    core.slots.take(core.agents[i])
    core.start(key, i, key)
    return key


def run_on(
    core: HostCore, i: int, ok: bool, latency_s: float = FAST, kind: str | None = None
) -> Any:
    """One task on agent ``i`` from start to finish; returns the handoffs."""
    return core.finish(begin_on(core, i), ok, latency_s, kind)


def fill(core: HostCore, hint: RoutingHint | None = None) -> list[int]:
    """Place tasks until the core refuses one; the agents they went to."""
    got = []
    while (i := core.place(hint)) is not None:
        got.append(i)
    return got


class Ticker:
    """Calls ``core.tick`` every ``tick_s`` of virtual time, as the shell's loop does."""

    def __init__(self, core: HostCore, clock: FakeClock):
        self.core, self.clock = core, clock
        self.last: float | None = None

    def tick(self, gap_s: float | None = None) -> TickActions:
        now = self.clock.advance(self.core.tick_s if gap_s is None else gap_s)
        act = self.core.tick(now, self.last)
        self.last = now
        return act

    def run(self, seconds: float) -> Iterator[tuple[float, TickActions]]:
        """Tick for ``seconds``, yielding each tick's time (from the start) and actions
        as it happens, so the caller can answer (a heartbeat) before the next tick."""
        t0 = self.clock()
        for _ in range(round(seconds / self.core.tick_s)):
            act = self.tick()
            yield self.clock() - t0, act


# --- slots and routing -----------------------------------------------------------------


def test_place_takes_a_slot_and_a_full_host_refuses():
    core, _ = make_core(n=2, slots=2)
    got = [core.place(None) for _ in range(4)]
    assert sorted(got) == [0, 0, 1, 1]
    assert [a.in_flight for a in core.agents] == [2, 2]
    assert core.place(None) is None
    assert core.in_flight == 4 and core.slots.free_slots == 0


def test_a_freed_slot_goes_to_the_oldest_waiter_and_a_withdrawn_one_is_skipped():
    core, _ = make_core(n=1, slots=1)
    key, _ = start(core)
    for token in ("a", "b", "c"):
        core.wait(token, None)
    assert core.finish(key, True, FAST, None) == [("a", 0)]
    assert core.withdraw("b") is True
    assert core.withdraw("b") is False, "it no longer waits"
    core.start("ka", 0, "ka")
    assert core.finish("ka", True, FAST, None) == [("c", 0)]
    assert list(core.slots.waiters) == []
    # a released slot with nobody waiting just goes back to the free list
    assert list(core.release(0)) == [] and core.place(None) == 0


def test_set_active_drains_the_agents_above_n():
    core, _ = make_core(n=3, slots=1)
    running = dict(start(core)[::-1] for _ in range(3))  # agent -> key
    assert set(running) == {0, 1, 2}
    assert core.set_active(2) == []
    assert core.agents[2].breaker is None and 2 not in core.health.members
    core.wait("w", None)
    # the drained agent finishes what it runs, but its slot is not handed on
    assert list(core.finish(running[2], True, FAST, None)) == []
    assert core.agents[2].in_flight == 0
    assert list(core.slots.waiters) == [("w", None)]
    assert core.place(None) is None
    assert core.finish(running[0], True, FAST, None) == [("w", 0)]
    # and it takes work again once it is active again
    core.wait("w2", None)
    assert core.set_active(3) == [("w2", 2)]
    assert 2 in core.health.members and core.agents[2].breaker is not None


def test_round_robin_spreads_evenly_and_keeps_its_turn_as_slots_free_up():
    core, _ = make_core(n=3, slots=2, routing={"router": "round_robin"})
    assert fill(core) == [0, 1, 2, 0, 1, 2]
    core, _ = make_core(n=3, slots=2, routing={"router": "round_robin"})
    running: deque[str] = deque()
    got = []
    for _ in range(60):  # four tasks in flight, the oldest ends before the next starts
        if len(running) == 4:
            core.finish(running.popleft(), True, FAST, None)
        key, i = start(core)
        running.append(key)
        got.append(i)
    assert got == [0, 1, 2] * 20


def test_least_loaded_picks_the_less_loaded_agent():
    core, _ = make_core(n=2, slots=4)
    for _ in range(3):
        core.slots.take(core.agents[0])
    # 0/4, 1/4, 2/4 on agent 1 against 3/4 on agent 0
    assert [core.place(None) for _ in range(3)] == [1, 1, 1]


def test_specialization_sends_a_typed_task_to_an_expert_then_falls_back():
    core, _ = make_core(n=3, slots=2, routing={"router": "specialization"})
    core.agents[2].expertise = frozenset({"billing"})
    billing, tech = RoutingHint(task_type="billing"), RoutingHint(task_type="tech")
    assert core.place(tech) in {0, 1}, "no expert for it: generalists first"
    assert [core.place(billing), core.place(billing)] == [2, 2]
    assert core.place(billing) in {0, 1}, "the expert is full: a generalist"
    assert core.slots.router.fallbacks == 2


def test_specialization_wait_hands_a_waiting_task_only_to_an_expert():
    routing = {"router": "specialization", "specialization": {"fallback": "wait"}}
    core, _ = make_core(n=2, slots=1, routing=routing)
    core.agents[1].expertise = frozenset({"billing"})
    billing = RoutingHint(task_type="billing")
    on_expert = begin_on(core, 1)
    assert core.place(billing) is None, "the generalist is free but the task waits"
    core.wait("w", billing)
    general = begin_on(core, 0)
    assert list(core.finish(general, True, FAST, "x")) == [], "passed over: not an expert"
    assert core.finish(on_expert, True, FAST, "billing") == [("w", 1)]


def test_affinity_sends_a_key_to_the_same_agent_while_the_set_is_stable():
    core, _ = make_core(n=4, slots=4, routing={"router": "affinity"})
    router = core.slots.router
    keys = [f"user-{k}" for k in range(20)]

    def where(key: str) -> int:
        key_, i = start(core, RoutingHint(affinity_key=key))
        core.finish(key_, True, FAST, None)
        return i

    owners = {k: router.owner(k, core.agents[:4]) for k in keys}
    assert len(set(owners.values())) == 4, "the keys spread over the agents"
    for _ in range(3):
        assert {k: where(k) for k in keys} == owners
    core.set_active(3)  # agent 3 leaves: only its keys move
    after = {k: where(k) for k in keys}
    for k in keys:
        if owners[k] == 3:
            assert after[k] == router.owner(k, core.agents[:3]) != 3
        else:
            assert after[k] == owners[k], k


def test_success_rate_stops_choosing_an_agent_that_keeps_failing_a_type():
    core, _ = make_core(
        n=2, slots=1, routing={"router": "success_rate", "success_rate": {"min_calls": 3}}
    )
    sql, chat = RoutingHint(task_type="sql"), RoutingHint(task_type="chat")
    core.agents[1].latency_s = SLOW  # the balancer alone would prefer agent 0

    def pick(hint: RoutingHint) -> int:
        key, i = start(core, hint)
        core.finish(key, True, SLOW if i == 1 else FAST, hint.task_type)
        return i

    assert pick(sql) == 0
    for _ in range(3):
        run_on(core, 0, False, FAST, "sql")
    assert [pick(sql) for _ in range(10)] == [1] * 10
    assert pick(chat) == 0, "only the failed type is kept away from it"


def test_a_held_agent_takes_no_work_and_keeps_what_it_runs_until_admitted():
    core, _ = make_core(n=2, slots=2)
    key = begin_on(core, 0)
    core.hold(0)
    assert fill(core) == [1, 1], "agent 0 has a free slot but is held"
    assert list(core.finish(key, True, FAST, None)) == []
    assert core.agents[0].in_flight == 0
    core.admit(0)
    assert fill(core) == [0, 0]


def test_without_a_health_spec_failures_never_take_an_agent_out():
    clock = FakeClock()
    resilience = ResilienceSpec.model_validate(NO_BREAKERS)
    core = HostCore(
        "pool/h", 2, 1, RoutingSpec(), resilience, None, clock=clock, rng=random.Random(0)
    )
    core.set_active(2)
    for _ in range(20):
        run_on(core, 0, False)
    acts = list(Ticker(core, clock).run(60))
    assert not core.agent_failing(0) and sorted(fill(core)) == [0, 1]
    assert all(a.beat == [] and a.restart == [] for _, a in acts)


# --- breakers --------------------------------------------------------------------------

BREAKER = {
    "window_calls": 4,
    "min_calls": 2,
    "failure_rate_threshold": 0.5,
    "open_duration_s": 10,
    "max_open_duration_s": 100,
    "half_open_probe_calls": 2,
}


def breaker_core(n: int = 4, slots: int = 1, **ejection: float) -> tuple[HostCore, FakeClock]:
    return make_core(
        n, slots, resilience={"agent_breaker": BREAKER, "ejection": ejection or {}}
    )


def trip(core: HostCore, i: int) -> None:
    run_on(core, i, False)
    run_on(core, i, False)


def test_an_agent_whose_breaker_opens_leaves_routing():
    core, _ = breaker_core()
    trip(core, 0)
    assert core.agents[0].breaker.state is OPEN
    assert sorted(fill(core)) == [1, 2, 3], "agent 0 has a free slot but gets nothing"
    assert core.agents[0].in_flight == 0


@pytest.mark.parametrize("share,ejected", [(0.25, {0}), (0.5, {0, 1})])
def test_the_ejection_cap_keeps_breakers_closed_beyond_max_ejected_share(share, ejected):
    core, _ = breaker_core(max_ejected_share=share)
    trip(core, 0)
    trip(core, 1)
    reg = core.breakers.registry
    assert reg.ejected == {core.agents[i].id for i in ejected}
    if 1 not in ejected:
        assert core.agents[1].breaker.state is CLOSED
        assert core.agents[1].breaker.denied_trips == 1
    assert sorted(fill(core)) == sorted(set(range(4)) - ejected)
    assert not reg.panic


def test_panic_mode_routes_to_every_agent_when_too_few_are_healthy():
    core, _ = breaker_core(max_ejected_share=1.0, panic_threshold=0.5)
    trip(core, 0)
    trip(core, 1)
    assert sorted(fill(core)) == [2, 3], "2 of 4 healthy: not below the threshold"
    for i in (2, 3):
        core.release(i)
    trip(core, 2)  # 1 of 4 healthy
    assert sorted(fill(core)) == [0, 1, 2, 3]
    assert core.breakers.registry.panic
    assert [core.agents[i].breaker.state for i in range(3)] == [OPEN] * 3


def test_an_open_breaker_turns_half_open_with_time_and_a_probe_success_closes_it():
    core, clock = breaker_core(slots=10)
    t = Ticker(core, clock)
    trip(core, 0)
    running = fill(core)
    assert Counter(running) == {1: 10, 2: 10, 3: 10}
    core.wait("w", None)
    clock.advance(10 - 0.5 - core.tick_s)
    assert t.tick().handoffs == [], "still open 9.5 s after the trip"
    assert core.agents[0].breaker.state is OPEN
    # open_duration_s has passed: the tick hands the waiting task to the half-open agent
    assert t.tick().handoffs == [("w", 0)]
    assert core.agents[0].breaker.state is HALF_OPEN
    core.start("probe-1", 0, "probe-1")
    key, i = start(core)
    assert i == 0, "the second probe call"
    assert core.place(None) is None, "half-open: its two probe calls and no more"
    assert core.agents[0].in_flight == 2
    core.finish("probe-1", True, FAST, None)
    assert core.agents[0].breaker.state is HALF_OPEN
    core.finish(key, True, FAST, None)
    assert core.agents[0].breaker.state is CLOSED
    assert fill(core) == [0] * 10, "routable again, with all its slots"
    assert core.breakers.registry.ejected == frozenset()


def test_place_alone_finds_the_half_open_agent_without_a_tick():
    # a driver with no periodic tick (the simulator) relies on place() looking again
    # once the open duration has passed
    core, clock = breaker_core(n=2)
    trip(core, 0)
    assert fill(core) == [1]
    assert core.next_recheck_s == clock() + 10
    clock.advance(10)
    assert core.place(None) == 0


def test_a_half_open_agent_starts_from_a_clean_slate_in_the_router():
    # its success stats date from before the trip: kept, they would starve the probes
    core, clock = make_core(
        2,
        1,
        routing={"router": "success_rate", "success_rate": {"min_calls": 3}},
        resilience={"agent_breaker": BREAKER},
    )
    sql = RoutingHint(task_type="sql")
    run_on(core, 1, True, SLOW, "sql")  # agent 1 is the slower one
    for _ in range(3):
        run_on(core, 0, False, FAST, "sql")
    assert core.agents[0].breaker.state is OPEN
    clock.advance(10)
    assert core.place(sql) == 0, "the probe goes to the half-open agent"
    assert core.agents[0].breaker.state is HALF_OPEN and core.agents[0].latency_s == 0.0


def test_deferred_breaker_feeds_leave_the_breaker_exactly_as_feeding_all():
    # The core owes a clean closed breaker its fast successes and pays them before the
    # next failure or slow call (or a stats read); a reference breaker fed every
    # outcome at once must be in the same state at every step, and hold the same
    # window whenever the debt is paid.
    res = {
        "agent_breaker": {
            "window_calls": 8,
            "min_calls": 4,
            "failure_rate_threshold": 0.5,
            "slow_call_duration_s": 1.0,
            "slow_call_rate_threshold": 0.5,
            "open_duration_s": 1e6,
            "max_open_duration_s": 1e6,
        }
    }
    core, clock = make_core(1, resilience=res)
    ref = CircuitBreaker("ref", ResilienceSpec.model_validate(res).agent_breaker, clock)
    agent = core.agents[0]
    brk = agent.breaker
    assert brk is not None
    fed = []
    real_record = brk.record
    brk.record = lambda ok, latency_s=None: (  # type: ignore[method-assign]
        fed.append(ok),
        real_record(ok, latency_s),
    )
    rng = random.Random(3)
    opens = 0
    for step in range(3_000):
        # long healthy runs, then bursts of failures or slow calls
        bad = rng.random() < (0.6 if step % 200 > 180 else 0.02)
        ok = not (bad and rng.random() < 0.5)
        latency = 2.0 if bad and ok else 0.01
        core.breakers.observe(agent, ok, latency)
        ref.record(ok, latency)
        got, want = brk.snapshot(), ref.snapshot()
        assert (got.state, got.trips) == (want.state, want.trips), step
        if step % 50 == 0 or want.state is not BreakerState.CLOSED:
            core.breakers.pay(agent)
            got = brk.snapshot()
            assert (got.calls, got.failure_rate, got.slow_rate) == (
                want.calls,
                want.failure_rate,
                want.slow_rate,
            ), step
        if want.state is BreakerState.OPEN:  # start over from closed on both
            opens += 1
            brk.reset()
            ref.reset()
    assert opens >= 5, "the sequence must trip the breaker now and then"
    assert len(fed) < 3_000 / 2, "most fast successes were deferred, not fed"


def test_settle_breakers_pays_the_owed_successes_before_a_stats_read():
    core, _ = breaker_core(n=1)
    for _ in range(3):
        run_on(core, 0, True)
    assert core.agents[0].owed == 3 and core.agents[0].breaker.snapshot().calls == 0
    core.settle_breakers()
    assert core.agents[0].owed == 0 and core.agents[0].breaker.snapshot().calls == 3


def test_a_dependency_breaker_named_like_an_agent_leaves_the_agent_breaker_alone():
    res = {"agent_breaker": {"window_calls": 10, "min_calls": 4}}
    core, clock = make_core(1, resilience=res)
    ref = CircuitBreaker("ref", ResilienceSpec.model_validate(res).agent_breaker, clock)
    agent = core.agents[0]
    for _ in range(10):
        core.breakers.observe(agent, True, FAST)
        ref.record(True, FAST)
    core.breakers.registry.dependency("redis/0").force_open("down")
    for _ in range(4):  # 6 successes and 4 failures in the window: 0.4 < 0.5
        core.breakers.observe(agent, False, FAST)
        ref.record(False, FAST)
    assert ref.state is CLOSED
    assert agent.breaker.state is CLOSED


# --- retries ---------------------------------------------------------------------------

RETRY = {
    "jitter_ratio": 0,
    "initial_backoff_s": 1,
    "backoff_multiplier": 2,
    "max_backoff_s": 30,
    "max_attempts": 3,
}


def retry_core(**retry: Any) -> HostCore:
    return make_core(1, resilience={"retry": {**RETRY, **retry}})[0]


def test_a_retryable_failure_is_retried_after_the_backoff_until_max_attempts():
    core = retry_core()
    assert core.decide_retry(0, "timeout", None) == Retry(1.0, "timeout", None)
    assert core.decide_retry(1, "timeout", None) == Retry(1.0, "timeout", None)
    assert core.decide_retry(2, "upstream", "TimeoutError: slow") == Retry(
        2.0, "upstream", "TimeoutError: slow"
    )
    assert core.decide_retry(3, "timeout", "late") == Retry(
        None, "max_attempts", "max_attempts after attempt 3: timeout: late"
    )
    assert core.retries.retries == 3
    assert core.retries.final == {"max_attempts": 1}


def test_with_retries_off_a_failure_keeps_its_own_reason():
    core = retry_core(max_attempts=1)
    assert core.decide_retry(1, "timeout", "TimeoutError") == Retry(
        None, "timeout", "TimeoutError"
    )
    assert core.retries.final == {"max_attempts": 1}


def test_max_deliveries_below_max_attempts_ends_retries_first():
    core = make_core(1, resilience={"max_deliveries": 2, "retry": RETRY})[0]
    assert core.decide_retry(1, "timeout", None).delay_s == 1.0
    assert core.decide_retry(2, "timeout", None).reason == "max_attempts"


@pytest.mark.parametrize(
    "reason,error",
    [("error", "ValueError: bad input"), ("bad_output", "output is not JSON"), ("x", None)],
)
def test_a_failure_that_is_not_retryable_is_final_with_its_own_reason(reason, error):
    core = retry_core(retry_unknown_errors=False)
    assert core.decide_retry(1, reason, error) == Retry(None, reason, error)
    assert core.retries.final == {"not_retryable": 1} and core.retries.retries == 0


def test_the_retry_budget_refuses_once_spent_and_first_attempts_feed_it():
    core = retry_core(budget_ratio=0.5, min_retries_per_s=0)
    refused = Retry(
        None, "retry_budget_exhausted", "retry_budget_exhausted after attempt 1: timeout: None"
    )
    assert core.decide_retry(1, "timeout", None) == refused, "no traffic, no floor"
    core.first_attempts(4)  # 0.5 x 4: two retries
    assert core.decide_retry(1, "timeout", None).delay_s == 1.0
    assert core.decide_retry(1, "timeout", None).delay_s == 1.0
    assert core.decide_retry(1, "timeout", None) == refused
    assert core.retries.policy.budget.denied == 2
    assert core.retries.retries == 2


def test_a_deadline_sooner_than_the_delay_is_final():
    core = retry_core()
    assert core.decide_retry(2, "timeout", None, time_left_s=2.5).delay_s == 2.0
    assert core.decide_retry(2, "timeout", None, time_left_s=2.0) == Retry(
        None, "deadline", "deadline after attempt 2: timeout: None"
    )


# --- health ----------------------------------------------------------------------------

HEALTH = {
    "heartbeat_interval_s": 1,
    "heartbeat_timeout_s": 3,
    "startup_timeout_s": 5,
    "hung_task_grace_s": 2,
    "error_min_calls": 4,
    "error_rate_threshold": 0.5,
    "restart": {
        "initial_backoff_s": 2,
        "backoff_multiplier": 2,
        "max_backoff_s": 60,
        "jitter_ratio": 0,
    },
}


def health_core(n: int = 2, **health: Any) -> tuple[HostCore, FakeClock]:
    return make_core(n, 1, resilience=NO_BREAKERS, health={**HEALTH, **health})


def fail_health(core: HostCore, i: int) -> None:
    """Four failures in a row: the error rate trips on the last one."""
    for _ in range(4):
        run_on(core, i, False)
    assert core.agent_failing(i)


def restarts(acts: Iterable[tuple[float, TickActions]]) -> list[tuple[float, list]]:
    return [(t, a.restart) for t, a in acts if a.restart]


def test_a_failure_that_trips_the_error_rate_takes_the_agent_out_at_once():
    core, _ = health_core()
    run_on(core, 0, False)
    run_on(core, 0, False)
    busy = begin_on(core, 1)
    k0 = begin_on(core, 0)
    core.wait("w0", None)
    # third failure: 3 calls < error_min_calls, the slot is handed on
    assert core.finish(k0, False, FAST, None) == [("w0", 0)]
    core.start("w0", 0, "w0")
    core.wait("w1", None)
    # fourth: the agent leaves routing before its slot could be handed on
    assert list(core.finish("w0", False, FAST, None)) == []
    assert core.agent_failing(0)
    assert core.health.monitor.state(core.agents[0].id) is AgentState.UNHEALTHY
    assert core.agents[0].in_flight == 0 and core.place(None) is None
    assert list(core.slots.waiters) == [("w1", None)]
    assert core.finish(busy, True, FAST, None) == [("w1", 1)]


def test_a_failed_agent_restarts_after_its_backoff_and_is_back_once_set_up():
    core, clock = health_core()
    fail_health(core, 0)
    assert restarts(Ticker(core, clock).run(3)) == [(2.0, [(0, 1)])], "2 s, no jitter"
    assert core.health.monitor.state(core.agents[0].id) is AgentState.RESTARTING
    assert core.agent_failing(0) and core.place(None) == 1
    assert core.restart_done(0, ["sql"], 2.0) is True
    assert not core.agent_failing(0)
    assert core.agents[0].expertise == {"sql"} and core.agents[0].weight == 2.0
    assert core.place(None) == 0
    assert core.restart_done(0, [], 1.0) is False, "not restarting any more"
    assert core.health.restarts == 1


def test_a_restarted_agent_starts_from_a_clean_slate_in_the_router():
    core, clock = make_core(
        2,
        1,
        routing={"router": "success_rate", "success_rate": {"min_calls": 3}},
        resilience=NO_BREAKERS,
        health=HEALTH,
    )
    sql = RoutingHint(task_type="sql")
    run_on(core, 1, True, SLOW, "sql")  # agent 1 is the slower one
    for _ in range(4):
        run_on(core, 0, False, FAST, "sql")
    assert core.agent_failing(0)
    assert restarts(Ticker(core, clock).run(2)) == [(2.0, [(0, 1)])]
    assert core.restart_done(0, [], 1.0)
    assert core.place(sql) == 0, "its failures were the old instance's"


def test_a_restart_waits_for_a_permit_when_the_fleet_guard_is_open():
    core, clock = health_core()
    fail_health(core, 0)
    core.apply_verdict("open", 0)
    assert restarts(Ticker(core, clock).run(4)) == []
    assert core.health.monitor.due_restarts() == 1
    core.apply_verdict("open", 1)
    pending = core.take_pending()
    assert pending is not None and pending.restart == [(0, 1)]


def test_a_failed_restart_is_a_crash_and_the_next_one_backs_off_further():
    core, clock = health_core()
    fail_health(core, 0)
    t = Ticker(core, clock)
    assert restarts(t.run(2)) == [(2.0, [(0, 1)])]
    core.restart_failed(0, "restart 1 failed: ImportError")
    mon = core.health.monitor
    h = mon.agent(core.agents[0].id)
    assert h.state is AgentState.UNHEALTHY and h.last_failure is not None
    assert h.last_failure.reason is FailureReason.CRASHED
    assert mon.failure_counts == {"error_rate": 1, "crashed": 1}
    assert restarts(t.run(5)) == [(4.0, [(0, 2)])], "second failure: 2 x 2 s"


def test_a_stale_restart_failure_does_not_fail_a_re_activated_agent():
    core, clock = health_core()
    fail_health(core, 1)
    assert restarts(Ticker(core, clock).run(2)) == [(2.0, [(1, 1)])]
    core.set_active(1)  # drained while its restart runs
    core.set_active(2)  # back, a fresh member in service
    assert not core.agent_failing(1)
    core.restart_failed(1, "restart 1 failed: TimeoutError")
    assert not core.agent_failing(1)


@pytest.mark.parametrize("answer", [True, False])
def test_custom_heartbeats_are_asked_of_the_shell_and_the_core_beats_for_the_rest(answer):
    core, clock = health_core(n=3)
    core.custom_beat.add(1)
    asked = []
    for s, act in Ticker(core, clock).run(6):
        if act.beat:
            assert act.beat == [1]
            asked.append(s)
            if answer:
                core.heartbeat(1)
    assert asked == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5], "once per heartbeat interval"
    assert not core.agent_failing(0) and not core.agent_failing(2)
    assert core.agent_failing(1) is not answer
    if not answer:
        h = core.health.monitor.agent(core.agents[1].id)
        assert h.last_failure.reason is FailureReason.HEARTBEAT_MISSED


def test_a_host_stall_is_not_blamed_on_its_agents():
    core, clock = health_core(n=2)
    core.custom_beat.add(1)
    t = Ticker(core, clock)
    for _, act in t.run(2):
        if act.beat:
            core.heartbeat(1)
    act = t.tick(gap_s=10)  # the host's loop stalled for 10 s > heartbeat_timeout_s
    # agent 1 is asked for its heartbeat (the core beats for agent 0) and judged later
    assert act.beat == [1] and act.restart == []
    assert core.health.out == set()
    core.heartbeat(1)
    for _, act in t.run(3):
        if act.beat:
            core.heartbeat(1)
        assert act.restart == []
    assert core.health.out == set()
    assert core.health.monitor.failure_counts == {}


def test_health_problem_once_every_agent_is_out_for_startup_timeout_s():
    core, clock = health_core(n=2, cascade={"enabled": False})
    fail_health(core, 0)
    fail_health(core, 1)
    t = Ticker(core, clock)
    first = None
    for s, _ in t.run(7):
        if first is None and core.health_problem(clock()) is not None:
            first = s
    # out since the first tick (0.5 s); a problem once more than 5 s have passed
    assert first == 6.0
    problem = core.health_problem(clock())
    assert problem is not None and "startup_timeout_s=5s" in problem
    core.apply_verdict("open", 0)
    assert core.health_problem(clock()) is None, "the fleet guard holds restarts back"
    core.apply_verdict("closed", 0)
    assert core.health_problem(clock()) == problem
    mon = core.health.monitor
    restarting = [i for i in (0, 1) if mon.state(core.agents[i].id) is AgentState.RESTARTING]
    assert restarting, "restarts still run"
    assert core.restart_done(restarting[0], [], 1.0)
    assert core.health_problem(clock()) is None, "one agent back: no problem, at once"


# --- watch (task time limits, wedged agents) -------------------------------------------

WATCH = {"task_timeout_s": 10, **NO_BREAKERS}


def watch_core() -> tuple[HostCore, Ticker]:
    core, clock = make_core(2, 1, resilience=WATCH, health=HEALTH)
    return core, Ticker(core, clock)


def test_a_task_past_its_limit_is_cancelled_each_tick_then_abandoned_once():
    core, t = watch_core()
    key, i = start(core)
    core.arrive("waiting", t.clock())  # waiting for a slot counts too
    acts = {}
    for s, act in t.run(15):
        acts[s] = act
        if s == 11.0:
            core.leave("waiting")  # it gave up waiting: no more cancels
    assert all(a.cancel == [] for s, a in acts.items() if s <= 10)
    assert acts[10.5].cancel == acts[11.0].cancel == [key, "waiting"]
    assert all(a.cancel == [key] for s, a in acts.items() if s > 11)
    # first cancel at 10.5, grace 2 s: abandoned once, at 12.5
    assert [(s, a.abandon) for s, a in acts.items() if a.abandon] == [(12.5, [(key, 12.5)])]
    assert core.watch.n_abandoned == 1
    # the hung rule (10 + 2 s) reported its agent, not the other one; the restart
    # follows after the 2 s backoff
    h = core.health.monitor.agent(core.agents[i].id)
    assert h.last_failure is not None and h.last_failure.reason is FailureReason.HUNG_TASK
    assert not core.agent_failing(1 - i)
    assert restarts(acts.items()) == [(14.5, [(i, 1)])]


def test_the_late_end_of_an_abandoned_task_after_a_restart_releases_nothing():
    core, t = watch_core()
    key, i = start(core)
    assert restarts(t.run(15)) == [(14.5, [(i, 1)])]
    assert core.agents[i].in_flight == 0, "the restart gave its slot back"
    assert core.restart_done(i, [], 1.0)
    fresh = begin_on(core, i)
    begin_on(core, 1 - i)
    core.wait("w", None)
    assert list(core.finish(key, False, 15.0, None)) == []
    assert core.agents[i].in_flight == 1, "the new task keeps its slot"
    assert list(core.slots.waiters) == [("w", None)]
    assert key not in core.watch.since and t.tick().cancel == []
    assert core.finish(fresh, True, FAST, None) == [("w", i)]


def test_a_stalled_tick_abandons_nothing():
    core, t = watch_core()
    key, _ = start(core)
    acts = dict(t.run(10.5))
    assert acts[10.5].cancel == [key], "first cancel"
    act = t.tick(gap_s=3)  # 13.5: past the grace, but the cancel may not have landed
    assert act.cancel == [key] and act.abandon == []
    assert core.watch.n_abandoned == 0
    assert t.tick().abandon == [(key, 14.0)]


# --- parking ---------------------------------------------------------------------------


def test_parking_keeps_slots_and_evicts_the_waiters_when_every_slot_is_parked():
    core, _ = make_core(n=2, slots=1)
    a = core.place(None)
    assert core.park(a, 5.0) == (5.0, [])
    assert not core.all_parked()
    kb, b = start(core)
    assert {a, b} == {0, 1}
    core.wait("w1", None)
    assert core.finish(kb, True, FAST, None) == [("w1", b)], "the parked slot stays taken"
    core.wait("w2", None)
    assert core.park(b, 120.0) == (BUDGET_PARK_MAX_S, ["w2"])
    assert core.all_parked() and list(core.slots.waiters) == []
    assert list(core.unpark(a)) == []
    assert not core.all_parked()
    assert core.place(None) == a


def test_requeue_delay_is_none_on_the_last_delivery():
    core, _ = make_core(n=1, resilience={"max_deliveries": 5})
    i = core.place(None)
    assert i is not None
    core.park(i, 7.0)
    assert core.requeue_delay(1, None) == 7.0, "the park's retry_after_s"
    assert core.requeue_delay(3, 2.0) == 2.0
    assert core.requeue_delay(4, None) is None
    assert core.retries.retries == 2


def test_a_parked_slot_of_a_drained_agent_does_not_park_the_host():
    core, _ = make_core(n=2, slots=1)
    begin_on(core, 1)
    core.park(1, 5.0)  # agent 1's own budget refused the task
    core.set_active(1)
    assert core.agents[0].in_flight == 0
    assert not core.all_parked()


# --- record buffers --------------------------------------------------------------------


def test_record_buffers_arm_once_flush_at_max_and_excusals_do_not_count():
    rb = RecordBuffers(2, max_outcomes=3)
    assert rb.add(0, "a") == RecordBuffers.ARM
    assert rb.add(0, "b") == RecordBuffers.NONE
    assert rb.add(1, "x") == RecordBuffers.ARM, "each shard arms its own send"
    for k in range(5):
        assert rb.add(0, f"excused-{k}", outcome=False) == RecordBuffers.NONE
    assert rb.add(0, "c") == RecordBuffers.FLUSH
    assert rb.take(0) == ["a", "b", *(f"excused-{k}" for k in range(5)), "c"]
    assert rb.take(0) == []
    assert rb.add(0, "d") == RecordBuffers.ARM, "take resets the buffer"
    assert rb.add(0, "e") == RecordBuffers.NONE
    assert rb.add(0, "f") == RecordBuffers.FLUSH, "the count restarted at take"
    assert rb.take(1) == ["x"]
