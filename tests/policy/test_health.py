"""Health policy on a virtual clock: failure detection, the agent state machine, restart
backoff, and the cascade guard, ending with 30% of a fleet failing at once."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from fleet.policy.backoff import backoff_s
from fleet.policy.health import (
    TRANSITIONS,
    ActionKind,
    AgentState,
    CascadeGuard,
    EventKind,
    FailureDetector,
    FailureReason,
    GuardState,
    HealthEventLog,
    HealthMonitor,
)
from fleet.spec.health import CascadeSpec, HealthSpec, RestartSpec
from tests.utils import FakeClock

S = AgentState


def monitor(clock: FakeClock, seed: int = 0, **kw) -> tuple[HealthMonitor, HealthEventLog]:
    log = HealthEventLog(size=100_000)
    return HealthMonitor(HealthSpec(**kw), clock, random.Random(seed), [log]), log


def kinds(actions) -> list[tuple[str, str]]:
    return [(a.kind.value, a.agent_id) for a in actions]


# --- spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"heartbeat_interval_s": 10, "heartbeat_timeout_s": 10}, "must be greater than"),
        ({"error_rate_threshold": 0}, "outside (0, 1]"),
        ({"error_rate_threshold": 1.5}, "outside (0, 1]"),
        ({"restart": {"initial_backoff_s": 10, "max_backoff_s": 5}}, "max_backoff_s (5.0)"),
        ({"restart": {"jitter_ratio": 2}}, "outside [0, 1]"),
        ({"cascade": {"cascade_share": 0.1, "resume_share": 0.2}}, "resume_share (0.2)"),
        ({"cascade": {"half_open_growth": 1}}, "greater than 1"),
        ({"heartbeat_every_s": 3}, "Extra inputs"),
    ],
)
def test_bad_health_spec_is_rejected_with_the_value(bad, needle):
    with pytest.raises(ValidationError) as exc:
        HealthSpec(**bad)
    assert needle in str(exc.value)


def test_defaults_check_every_10s_and_guard_at_10_percent():
    spec = HealthSpec()
    assert spec.heartbeat_interval_s == 10 and spec.heartbeat_timeout_s == 30
    assert spec.cascade.cascade_share == 0.1
    assert spec.cascade.effective_resume_share == 0.05


# --- the failure detector ----------------------------------------------------------------


def test_missed_heartbeat_is_detected_after_the_timeout_not_before():
    det = FailureDetector(HealthSpec(heartbeat_interval_s=10, heartbeat_timeout_s=30))
    sig = det.new_signals(0.0)
    sig.last_heartbeat_s = 5.0
    assert det.check(sig, 35.0) is None
    failure = det.check(sig, 35.5)
    assert failure is not None and failure.reason is FailureReason.HEARTBEAT_MISSED
    assert "30.5s > heartbeat_timeout_s 30" in failure.detail


def test_a_start_that_never_reports_times_out():
    det = FailureDetector(HealthSpec(startup_timeout_s=20))
    sig = det.new_signals(100.0)
    assert det.check(sig, 120.0) is None
    assert det.check(sig, 120.1).reason is FailureReason.STARTUP_TIMEOUT


def test_a_task_past_its_own_limit_plus_grace_is_hung():
    det = FailureDetector(HealthSpec(hung_task_grace_s=5))
    sig = det.new_signals(0.0)
    sig.last_heartbeat_s = 0.0
    sig.tasks["short"] = (0.0, 10.0)
    sig.tasks["long"] = (0.0, 100.0)
    sig.last_heartbeat_s = 15.0
    assert det.check(sig, 15.0) is None
    f = det.check(sig, 15.5)
    assert f.reason is FailureReason.HUNG_TASK and "task short" in f.detail
    del sig.tasks["short"]
    sig.last_heartbeat_s = 100.0
    assert det.check(sig, 100.0) is None  # the long one is still within its limit


def test_error_rate_needs_min_calls_and_forgets_old_errors():
    det = FailureDetector(
        HealthSpec(error_window_s=60, error_min_calls=10, error_rate_threshold=0.5)
    )
    sig = det.new_signals(0.0)
    sig.last_heartbeat_s = 0.0
    for _ in range(9):
        det.record_outcome(sig, 1.0, ok=False)
    assert det.check(sig, 1.0) is None, "9 calls < error_min_calls"
    det.record_outcome(sig, 1.0, ok=True)
    f = det.check(sig, 1.0)
    assert f.reason is FailureReason.ERROR_RATE and "0.90 >= 0.5 over 10" in f.detail
    # A minute later those errors have left the window; fresh successes keep it healthy.
    for _ in range(20):
        det.record_outcome(sig, 70.0, ok=True)
    sig.last_heartbeat_s = 70.0
    assert det.check(sig, 70.0) is None
    assert det.error_rate(sig, 70.0) == (20, 0.0)


# --- the agent state machine -------------------------------------------------------------


def test_lifecycle_start_fail_backoff_restart_recover():
    clock = FakeClock(0.0)
    m, log = monitor(clock, restart={"initial_backoff_s": 4, "jitter_ratio": 0})
    m.add_agent("a", pool="p")
    assert m.state("a") is S.STARTING and not m.in_service("a")
    m.heartbeat("a")
    assert kinds(m.tick()) == [("admit", "a")] and m.in_service("a")
    for t in range(10, 40, 10):
        clock.t = t
        m.heartbeat("a")
        assert m.tick() == []
    clock.t = 70.5  # last heartbeat at 30: 40.5 s of silence
    actions = m.tick()
    assert kinds(actions) == [("remove", "a")]
    assert actions[0].reason == "heartbeat_missed"
    assert m.state("a") is S.UNHEALTHY and m.agent("a").next_restart_s == 74.5
    clock.t = 74.0
    assert m.tick() == []  # still backing off
    clock.t = 74.5
    restart = m.tick()
    assert kinds(restart) == [("restart", "a")] and restart[0].attempt == 1
    assert m.state("a") is S.RESTARTING
    clock.t = 76.0
    m.heartbeat("a")
    assert kinds(m.tick()) == [("admit", "a")] and m.state("a") is S.HEALTHY
    path = [(e.old, e.new) for e in log.of(EventKind.AGENT)]
    assert path == [
        ("starting", "healthy"),
        ("healthy", "unhealthy"),
        ("unhealthy", "restarting"),
        ("restarting", "healthy"),
    ]
    assert m.snapshot()["last_failures"][0]["reason"] == "heartbeat_missed"
    assert m.snapshot()["pools"]["p"]["healthy"] == 1


def test_every_transition_is_declared_and_illegal_ones_raise():
    assert TRANSITIONS[S.HEALTHY] == {S.UNHEALTHY}
    assert S.HEALTHY not in TRANSITIONS[S.EJECTED]
    clock = FakeClock(0.0)
    m, _ = monitor(clock)
    m.heartbeat("a")  # an unknown agent announces itself and is admitted
    assert m.state("a") is S.HEALTHY
    with pytest.raises(ValueError, match="no transition healthy -> starting"):
        m.reinstate("a")


def test_error_rate_failure_removes_the_agent_at_the_next_tick():
    clock = FakeClock(0.0)
    m, _ = monitor(clock, error_min_calls=4, error_rate_threshold=0.5)
    m.heartbeat("a")
    m.tick()
    for i in range(4):
        m.task_started("a", f"t{i}")
        m.task_finished("a", f"t{i}", ok=i == 0)
    assert m.state("a") is S.UNHEALTHY, "removed from service at once"
    assert kinds(m.tick()) == [("remove", "a")]


def test_hung_task_uses_the_task_limit_and_the_default():
    clock = FakeClock(0.0)
    m, _ = monitor(
        clock, default_task_limit_s=50, hung_task_grace_s=0, heartbeat_timeout_s=1_000
    )
    for a in ("a", "b"):
        m.heartbeat(a)
    m.task_started("a", "x", limit_s=20)
    m.task_started("b", "y")
    m.tick()
    clock.t = 21
    assert kinds(m.tick()) == [("remove", "a")]
    clock.t = 51
    assert ("remove", "b") in kinds(m.tick())
    assert m.agent("b").last_failure.reason is FailureReason.HUNG_TASK


def test_a_partitioned_agent_recovers_on_heartbeat_without_a_restart():
    clock = FakeClock(0.0)
    m, _ = monitor(
        clock, error_min_calls=2, restart={"initial_backoff_s": 60, "max_backoff_s": 60}
    )
    for a in ("a", "b"):
        m.heartbeat(a)
    m.tick()
    for i in range(2):  # b fails by error rate
        m.task_started("b", f"t{i}")
        m.task_finished("b", f"t{i}", ok=False)
    clock.t = 31  # a misses its heartbeats (a partition)
    assert sorted(kinds(m.tick())) == [("remove", "a"), ("remove", "b")]
    m.heartbeat("a")
    m.heartbeat("b")
    assert kinds(m.tick()) == [("admit", "a")]
    assert m.agent("a").restarts == 0
    assert m.state("b") is S.UNHEALTHY, "a heartbeat does not cure an error rate"
    assert m.agent("b").last_failure.reason is FailureReason.ERROR_RATE
    m.report_failure("b", "boom")  # already out of service: no second failure
    assert m.agent("b").failures == 1


def test_agents_that_fail_too_often_are_ejected_and_can_be_reinstated():
    clock = FakeClock(0.0)
    m, _ = monitor(clock, restart={"initial_backoff_s": 0, "eject_after_failures": 3})
    m.heartbeat("a")
    m.tick()
    for n in range(1, 4):
        m.report_failure("a", f"crash {n}")
        actions = m.tick()
        if n < 3:
            assert kinds(actions) == [("remove", "a"), ("restart", "a")]
            m.heartbeat("a")
            m.tick()
    assert kinds(actions) == [("remove", "a"), ("eject", "a")]
    assert m.state("a") is S.EJECTED
    m.heartbeat("a")
    assert m.state("a") is S.EJECTED, "an ejected agent is not readmitted by heartbeats"
    m.reinstate("a")
    m.heartbeat("a")
    assert m.state("a") is S.HEALTHY and m.agent("a").failures == 0


def test_task_signals_for_unknown_agents_are_counted_not_lost():
    m, _ = monitor(FakeClock(0.0))
    m.task_started("ghost", "t")
    m.task_finished("ghost", "t", ok=False)
    assert m.ignored_signals == 2 and m.agent_ids() == []


# --- restart backoff ----------------------------------------------------------------------


def test_backoff_is_exponential_and_capped_without_jitter():
    spec = RestartSpec(
        initial_backoff_s=1, backoff_multiplier=2, max_backoff_s=30, jitter_ratio=0
    )
    rng = random.Random(0)
    assert [backoff_s(spec, n, rng) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(spec, 100_000, rng) == 30, "no overflow"
    with pytest.raises(ValueError):
        backoff_s(spec, 0, rng)


def test_jitter_stays_within_its_share_and_is_reproducible():
    spec = RestartSpec(initial_backoff_s=10, max_backoff_s=10, jitter_ratio=0.2)
    draws = [backoff_s(spec, 1, random.Random(s)) for s in range(300)]
    assert all(8 <= d <= 10 for d in draws) and max(draws) - min(draws) > 1.5
    assert backoff_s(spec, 1, random.Random(5)) == backoff_s(spec, 1, random.Random(5))


def test_backoff_grows_per_agent_and_resets_after_a_healthy_period():
    clock = FakeClock(0.0)
    m, _ = monitor(
        clock,
        restart={
            "initial_backoff_s": 1,
            "max_backoff_s": 100,
            "jitter_ratio": 0,
            "reset_after_s": 300,
            "eject_after_failures": None,
        },
    )
    m.heartbeat("a")
    m.heartbeat("b")
    m.tick()
    delays = []
    for _ in range(4):
        m.report_failure("a", "crash")
        m.tick()
        delays.append(m.agent("a").next_restart_s - clock.t)
        clock.advance(delays[-1])
        m.tick()
        m.heartbeat("a")
        m.tick()
    assert delays == [1, 2, 4, 8]
    m.report_failure("b", "crash")
    m.tick()
    assert m.agent("b").next_restart_s - clock.t == 1, "backoff is per agent"
    clock.advance(300)
    m.heartbeat("a")
    m.tick()
    assert m.agent("a").failures == 0
    m.report_failure("a", "crash")
    m.tick()
    assert m.agent("a").next_restart_s - clock.t == 1


# --- the cascade guard ----------------------------------------------------------------------


def test_guard_opens_above_the_share_throttles_and_alerts_once():
    log = HealthEventLog()
    g = CascadeGuard(
        CascadeSpec(cascade_share=0.1, max_restarts_per_interval=2, interval_s=10), [log]
    )
    assert g.observe(10, 100, 0.0) is GuardState.CLOSED, "10% is not more than 10%"
    assert all(g.try_restart(0.0) for _ in range(50)), "CLOSED: unlimited"
    assert g.observe(11, 100, 1.0) is GuardState.OPEN
    assert [g.try_restart(1.0), g.try_restart(2.0), g.try_restart(3.0)] == [True, True, False]
    assert not g.try_restart(10.9)  # the first grant (at 1.0) is still within 10 s
    assert g.try_restart(11.0) and not g.try_restart(11.5)
    g.observe(30, 100, 12.0)
    assert len(log.of(EventKind.ALERT_FIRING)) == 1
    assert "11 of 100 agents failing" in log.of(EventKind.ALERT_FIRING)[0].reason


def test_guard_needs_min_failing_agents_in_a_small_fleet():
    g = CascadeGuard(CascadeSpec(min_failing_agents=2))
    assert g.observe(1, 5, 0.0) is GuardState.CLOSED  # 20% but a single agent
    assert g.observe(2, 5, 0.0) is GuardState.OPEN


def test_probes_move_open_to_half_open_where_the_allowance_grows():
    g = CascadeGuard(
        CascadeSpec(
            max_restarts_per_interval=2, interval_s=10, half_open_growth=2, probe_successes=2
        )
    )
    g.observe(50, 100, 0.0)
    g.probe_succeeded(5.0)
    g.probe_failed(6.0)  # a failure resets the count
    g.probe_succeeded(7.0)
    assert g.state is GuardState.OPEN
    g.probe_succeeded(8.0)
    assert g.state is GuardState.HALF_OPEN
    assert [g.allowance(8.0 + 10 * k) for k in range(5)] == [2, 4, 8, 16, 32]
    assert g.allowance(8.0 + 10 * 60) == 100, "never more than the fleet"
    g.probe_failed(20.0)
    assert g.state is GuardState.OPEN and g.allowance(20.0) == 2


def test_guard_closes_only_when_the_share_is_low_and_the_allowance_covers_it():
    log = HealthEventLog()
    g = CascadeGuard(
        CascadeSpec(
            cascade_share=0.1, max_restarts_per_interval=2, interval_s=10, half_open_growth=2
        ),
        [log],
    )
    g.observe(40, 100, 0.0)
    assert g.observe(8, 100, 1.0) is GuardState.OPEN, "8% > resume share 5%"
    assert g.observe(4, 100, 2.0) is GuardState.HALF_OPEN, "allowance 2 < 4 failing"
    assert g.observe(4, 100, 12.0) is GuardState.CLOSED  # allowance now 4
    assert len(log.of(EventKind.ALERT_RESOLVED)) == 1
    assert [e.new for e in log.of(EventKind.GUARD)] == ["open", "half_open", "closed"]


def test_disabled_guard_never_opens():
    g = CascadeGuard(CascadeSpec(enabled=False))
    assert g.observe(90, 100, 0.0) is GuardState.CLOSED


# --- 30% of the fleet fails at once ----------------------------------------------------


class FakeFleet:
    """Agents on a virtual clock: each healthy agent heartbeats every 10 s and finishes a
    task every second; a faulty agent fails every task. A restarted agent reports
    (heartbeats) 2 s after its restart."""

    def __init__(self, n: int, spec: HealthSpec, seed: int = 1):
        self.clock = FakeClock(0.0)
        self.log = HealthEventLog(size=100_000)
        self.m = HealthMonitor(spec, self.clock, random.Random(seed), [self.log])
        self.ids = [f"agent-{i:03d}" for i in range(n)]
        self.faulty: set[str] = set()
        self.booting: dict[str, float] = {}
        self.restarts: list[tuple[float, str, GuardState]] = []
        self.guard_states: list[tuple[float, GuardState]] = []
        self.task_seq = 0
        for a in self.ids:
            self.m.heartbeat(a, pool="p")

    def step(self) -> None:
        t = self.clock.advance(1.0)
        for a, ready in list(self.booting.items()):
            if t >= ready:
                del self.booting[a]
                self.m.heartbeat(a)
        for a in self.ids:
            if not self.m.in_service(a):
                continue
            if int(t) % 10 == 0:
                self.m.heartbeat(a)
            self.task_seq += 1
            self.m.task_started(a, str(self.task_seq), limit_s=30)
            self.m.task_finished(a, str(self.task_seq), ok=a not in self.faulty)
        for action in self.m.tick():
            if action.kind is ActionKind.RESTART:
                self.restarts.append((t, action.agent_id, self.m.guard.state))
                self.booting[action.agent_id] = t + 2
        self.guard_states.append((t, self.m.guard.state))

    def run_until(self, t_end: float) -> None:
        while self.clock.t < t_end:
            self.step()


CASCADE_SPEC = HealthSpec(
    error_window_s=20,
    error_min_calls=5,
    error_rate_threshold=0.5,
    restart=RestartSpec(
        initial_backoff_s=1, max_backoff_s=20, jitter_ratio=0.2, eject_after_failures=None
    ),
    cascade=CascadeSpec(
        cascade_share=0.1,
        max_restarts_per_interval=3,
        interval_s=10,
        probe_successes=3,
        probe_healthy_s=20,
        half_open_growth=2,
    ),
)


def test_30_percent_failing_at_once_opens_the_breaker_throttles_and_recovers():
    fleet = FakeFleet(100, CASCADE_SPEC)
    fleet.run_until(60)
    assert fleet.m.counts()["healthy"] == 100 and fleet.restarts == []

    fault_start, fault_end = 60, 300
    fleet.faulty = set(random.Random(3).sample(fleet.ids, 30))
    fleet.run_until(fault_end)

    # The breaker opened and the alert fired, once, within seconds of the fault.
    alerts = fleet.log.of(EventKind.ALERT_FIRING)
    assert len(alerts) == 1 and fault_start < alerts[0].at_s <= fault_start + 10
    assert fleet.m.guard.state is GuardState.OPEN, "restarted agents keep failing"
    # Restarts were throttled as configured: never more than 3 in any 10 s while open.
    open_restarts = [t for t, _, g in fleet.restarts if g is not GuardState.CLOSED]
    for t0 in range(fault_start, fault_end):
        assert sum(1 for t in open_restarts if t0 <= t < t0 + 10) <= 3
    assert len(fleet.restarts) <= 3 * ((fault_end - fault_start) // 10 + 1)
    assert fleet.log.of(EventKind.RESTART_THROTTLED), "restarts were held back"
    assert fleet.m.counts()["healthy"] == 70, "only the faulty agents are out"

    fleet.faulty.clear()  # the fault is removed
    fleet.run_until(fault_end + 400)
    assert fleet.m.guard.state is GuardState.CLOSED
    assert len(fleet.log.of(EventKind.ALERT_RESOLVED)) == 1
    guard_path = [e.new for e in fleet.log.of(EventKind.GUARD)]
    assert guard_path[0] == "open" and guard_path[-2:] == ["half_open", "closed"]
    assert fleet.m.counts()["healthy"] == 100, "every agent is back in service"
    # Resumed gradually: the half-open allowance doubled from 3 per 10 s.
    half_open_at = next(
        e.at_s
        for e in fleet.log.of(EventKind.GUARD)
        if e.new == "half_open" and e.at_s > fault_end
    )
    first_10s = sum(1 for t, _, _ in fleet.restarts if half_open_at <= t < half_open_at + 10)
    assert 1 <= first_10s <= 3


def test_without_the_guard_the_same_fault_restarts_everyone_at_once():
    spec = CASCADE_SPEC.model_copy(update={"cascade": CascadeSpec(enabled=False)})
    fleet = FakeFleet(100, spec)
    fleet.run_until(60)
    fleet.faulty = set(random.Random(3).sample(fleet.ids, 30))
    fleet.run_until(75)
    assert len({a for t, a, _ in fleet.restarts if t < 75}) == 30
    assert fleet.log.of(EventKind.ALERT_FIRING) == []


# --- a host's side of the fleet guard ------------------------------------------------------


def test_fleet_gate_restarts_freely_only_on_a_fresh_closed_verdict():
    from fleet.policy.health import FleetGate

    clock = FakeClock(0.0)
    spec = CascadeSpec(
        cascade_share=0.1, min_failing_agents=2, max_restarts_per_interval=1, interval_s=10
    )
    gate = FleetGate(spec, stale_after_s=5)
    gate.apply("closed", 0, clock())
    gate.observe(1, 20, clock())  # 5% of this host: not suspect
    assert gate.try_restart(clock()) and gate.try_restart(clock())
    # This host's own share is high: hold until the fleet guard grants permits.
    gate.observe(6, 20, clock())
    assert not gate.try_restart(clock())
    assert gate.report(6, 20, restarts_due=6)["restarts_wanted"] == 6
    gate.apply("open", 2, clock())
    assert gate.state is GuardState.OPEN
    assert [gate.try_restart(clock()) for _ in range(3)] == [True, True, False]
    # Probe fates are reported once.
    gate.probe_failed(clock())
    gate.probe_succeeded(clock())
    assert gate.report(6, 20, 0)["probe_failed"] == 1
    assert gate.report(6, 20, 0)["probe_failed"] == 0
    # No verdict for longer than stale_after_s: the host's own guard decides, within
    # its allowance (1 per 10 s, it opened on the 30% it saw).
    clock.advance(6)
    gate.observe(6, 20, clock())
    assert not gate.fresh(clock()) and gate.local.state is GuardState.OPEN
    assert [gate.try_restart(clock()) for _ in range(3)] == [True, False, False]
    assert gate.throttled >= 3


# --- event-driven use (the simulator's): one agent at a time, no detection pass --------


def test_event_driven_restart_of_one_agent_waits_for_its_backoff_and_a_permit():
    clock = FakeClock(0.0)
    m, _ = monitor(
        clock,
        restart={"initial_backoff_s": 4, "jitter_ratio": 0},
        cascade={
            "cascade_share": 0.1,
            "min_failing_agents": 1,
            "max_restarts_per_interval": 1,
            "probe_successes": 1,
        },
    )
    for name in "abcdefghij":
        m.heartbeat(name)  # admitted at once: a heartbeat announces an unknown agent
    assert len(m.take_actions()) == 10 and m.failing_and_total() == (0, 10)
    m.report_failure("a", "killed")
    m.report_failure("b", "killed")
    assert kinds(m.take_actions()) == [("remove", "a"), ("remove", "b")]
    assert m.failing_and_total() == (2, 10)
    assert m.observe_guard() is GuardState.OPEN  # 20% > 10%
    assert not m.restart("a")  # backing off until t=4
    clock.t = 4.0
    assert m.restart("a") and kinds(m.take_actions()) == [("restart", "a")]
    assert m.agent("a").probe  # granted while the guard was open
    assert not m.restart("b") and m.state("b") is S.UNHEALTHY  # the one permit is taken
    assert m.failing_and_total() == (2, 10)  # restarting still counts as failing
    m.heartbeat("a")
    m.take_actions()
    clock.t = 4.0 + m.spec.cascade.probe_healthy_s - 0.1
    m.settle_probes()
    assert m.agent("a").probe  # not yet healthy for probe_healthy_s
    clock.t = 4.0 + m.spec.cascade.probe_healthy_s
    m.settle_probes()
    assert not m.agent("a").probe and m.guard.state is GuardState.HALF_OPEN
    m.remove_agent("c")
    assert m.failing_and_total() == (1, 9)


def test_ignore_backoff_restarts_before_the_backoff_when_the_driver_chose_the_delay():
    clock = FakeClock(0.0)
    m, _ = monitor(clock, restart={"initial_backoff_s": 30, "jitter_ratio": 0})
    m.heartbeat("a")
    m.report_failure("a", "killed")
    assert not m.restart("a")
    assert m.restart("a", ignore_backoff=True) and m.state("a") is S.RESTARTING
    assert not m.restart("a", ignore_backoff=True)  # only an unhealthy agent restarts


def test_state_counts_kept_per_transition_match_a_recount():
    clock = FakeClock(0.0)
    m, _ = monitor(clock, restart={"eject_after_failures": 2, "initial_backoff_s": 1})
    rng = random.Random(5)
    names = [f"x{i}" for i in range(30)]
    for step in range(2_000):
        clock.t = step * 0.5
        n = rng.choice(names)
        op = rng.random()
        if op < 0.4:
            m.heartbeat(n)
        elif op < 0.6:
            m.report_failure(n, "killed")
        elif op < 0.65:
            m.remove_agent(n)
        elif op < 0.7 and n in m.agent_ids(S.EJECTED):
            m.reinstate(n)
        else:
            m.restart(n)
        m.take_actions()
        if step % 50 == 0:
            m.tick()
        recount = {s.value: len(m.agent_ids(s)) for s in S}
        assert m.counts() == recount, step
        failing = recount["unhealthy"] + recount["restarting"]
        assert m.failing_and_total() == (failing, len(m.agent_ids()))
