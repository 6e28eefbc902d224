"""Health of logical agents: failure detection, restart backoff and the cascade guard.

Three small parts, composed by ``HealthMonitor``:

- ``FailureDetector`` turns an agent's signals (heartbeats, tasks started and finished)
  into a verdict: missed heartbeats, a (re)start that never reported, a task running past
  its limit (hung), or an error rate over a sliding window.
- restarts are spaced by fleet's backoff rule (``fleet.policy.backoff.backoff_s`` over
  ``health.restart``): exponentially, with a cap and jitter from an injected
  ``random.Random``; an agent healthy for ``reset_after_s`` starts over.
- ``CascadeGuard`` is a fleet-level breaker over restarts. When more than
  ``cascade_share`` of the fleet is failing at once, mass restarts would themselves
  become the outage (thundering herd on shared dependencies, schedulers, caches), so it
  opens, raises an alert and allows only a few restarts per interval; their outcome
  decides when to resume, gradually.

Each agent follows an explicit state machine (``TRANSITIONS``)::

    STARTING --heartbeat--> HEALTHY --failure--> UNHEALTHY --backoff+permit--> RESTARTING
    STARTING/RESTARTING --no heartbeat within startup_timeout_s--> UNHEALTHY
    RESTARTING --heartbeat--> HEALTHY
    UNHEALTHY --heartbeat, if it failed only by missing heartbeats--> HEALTHY
    UNHEALTHY --eject_after_failures consecutive failures--> EJECTED --reinstate--> STARTING

``FleetGate`` stands in for a ``CascadeGuard`` that runs elsewhere: a host's monitor
asks it, and it follows the verdicts of the fleet's one guard (in the controller).

Only HEALTHY agents are in service. Nothing here reads a clock or sleeps: ``clock``
returns monotonic seconds and the runtime calls ``tick()`` (at least every heartbeat
interval) and applies the ``HealthAction`` list it returns. A driver that sees failures
as events and has no heartbeats to check (the simulator, with ten thousand agents) skips
the O(agents) detection pass of ``tick`` and calls its O(1) parts itself:
``report_failure``, ``observe_guard``, ``restart(agent_id)`` when the agent's
``next_restart_s`` has come, and ``settle_probes`` ``probe_healthy_s`` after a probe.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from fleet.policy.backoff import backoff_s
from fleet.policy.breaker import TimeBuckets
from fleet.spec.health import CascadeSpec, HealthSpec

Clock = Callable[[], float]

DEFAULT_EVENT_LOG_SIZE = 1_000


# --- states, reasons, actions, events --------------------------------------------------


class AgentState(str, Enum):
    STARTING = "starting"  # joined (or reinstated), no heartbeat yet; not in service
    HEALTHY = "healthy"  # in service
    UNHEALTHY = "unhealthy"  # out of service, waiting for its restart (backoff or guard)
    RESTARTING = "restarting"  # restart ordered, waiting for its first heartbeat
    EJECTED = "ejected"  # failed too often; out until an operator reinstates it


S = AgentState
TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    S.STARTING: frozenset({S.HEALTHY, S.UNHEALTHY}),
    S.HEALTHY: frozenset({S.UNHEALTHY}),
    S.UNHEALTHY: frozenset({S.RESTARTING, S.HEALTHY, S.EJECTED}),
    S.RESTARTING: frozenset({S.HEALTHY, S.UNHEALTHY}),
    S.EJECTED: frozenset({S.STARTING}),
}
FAILING_STATES = frozenset({S.UNHEALTHY, S.RESTARTING})


class FailureReason(str, Enum):
    HEARTBEAT_MISSED = "heartbeat_missed"
    STARTUP_TIMEOUT = "startup_timeout"
    HUNG_TASK = "hung_task"
    ERROR_RATE = "error_rate"
    CRASHED = "crashed"  # reported by the host: the agent's process or loop died


@dataclass(frozen=True, slots=True)
class Failure:
    reason: FailureReason
    detail: str


class ActionKind(str, Enum):
    ADMIT = "admit"  # put the agent (back) in service
    REMOVE = "remove"  # take it out of service now; its leased work will be redelivered
    RESTART = "restart"  # restart it inside its host
    EJECT = "eject"  # out for good; the runtime may start a fresh agent in its place


@dataclass(frozen=True, slots=True)
class HealthAction:
    """One thing the runtime must do; ``attempt`` numbers an agent's restarts."""

    kind: ActionKind
    agent_id: str
    reason: str
    attempt: int = 0


class GuardState(str, Enum):
    CLOSED = "closed"  # restarts follow each agent's backoff
    OPEN = "open"  # at most max_restarts_per_interval restarts per interval
    HALF_OPEN = "half_open"  # the allowance grows each interval


class EventKind(str, Enum):
    AGENT = "agent"  # an agent changed state (old, new)
    GUARD = "guard"  # the cascade guard changed state (old, new)
    ALERT_FIRING = "alert_firing"
    ALERT_RESOLVED = "alert_resolved"
    RESTART_THROTTLED = "restart_throttled"  # restarts due but held back by the guard


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """Something the monitor or the guard did, for status, metrics and alerting."""

    at_s: float
    kind: EventKind
    subject: str  # an agent id, or the guard's name
    old: str | None = None
    new: str | None = None
    reason: str = ""


class HealthListener(Protocol):
    def on_health_event(self, event: HealthEvent) -> None: ...


class HealthEventLog:
    """A listener keeping the last ``size`` events and a count per kind (and new state)."""

    def __init__(self, size: int = DEFAULT_EVENT_LOG_SIZE):
        self.events: deque[HealthEvent] = deque(maxlen=size)
        self.counts: dict[str, int] = {}

    def on_health_event(self, event: HealthEvent) -> None:
        self.events.append(event)
        key = event.kind.value if event.new is None else f"{event.kind.value}:{event.new}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def of(self, kind: EventKind) -> list[HealthEvent]:
        return [e for e in self.events if e.kind is kind]


# --- failure detection -----------------------------------------------------------------


@dataclass(slots=True)
class AgentSignals:
    """What one agent has reported since its last (re)start."""

    started_s: float
    last_heartbeat_s: float | None = None
    tasks: dict[str, tuple[float, float]] = field(default_factory=dict)  # id: (start, limit)
    outcomes: TimeBuckets | None = None  # (calls, errors) over error_window_s


class FailureDetector:
    """Decides from an agent's signals whether it has failed, and why.

    Use ``check`` on a HEALTHY agent (every rule) or on one waiting for its first
    heartbeat (only the startup timeout applies: it has no heartbeat to miss yet).
    Times are monotonic seconds.
    """

    def __init__(self, spec: HealthSpec):
        self.spec = spec

    def new_signals(self, now_s: float) -> AgentSignals:
        return AgentSignals(started_s=now_s, outcomes=TimeBuckets(self.spec.error_window_s, 2))

    def record_outcome(self, signals: AgentSignals, now_s: float, ok: bool) -> None:
        assert signals.outcomes is not None
        signals.outcomes.add(now_s, 1, 0 if ok else 1)

    def error_rate(self, signals: AgentSignals, now_s: float) -> tuple[int, float]:
        """Outcomes in the window and the share that failed."""
        assert signals.outcomes is not None
        calls, errors = signals.outcomes.sums(now_s)
        return round(calls), (errors / calls if calls else 0.0)

    def hung(
        self, task_id: str, start_s: float, limit_s: float, now_s: float
    ) -> Failure | None:
        """The hung-task rule alone: a task started at ``start_s`` and allowed
        ``limit_s`` seconds is hung once it has run past its limit plus
        ``hung_task_grace_s``. A runtime that tracks running tasks itself (the host
        does) applies it and reports the verdict with ``HealthMonitor.report_failure``."""
        running = now_s - start_s
        if running > limit_s + self.spec.hung_task_grace_s:
            return Failure(
                FailureReason.HUNG_TASK,
                f"task {task_id} running {running:.1f}s > limit {limit_s}s "
                f"+ grace {self.spec.hung_task_grace_s}s",
            )
        return None

    def check(self, signals: AgentSignals, now_s: float) -> Failure | None:
        s = self.spec
        if signals.last_heartbeat_s is None:
            waited = now_s - signals.started_s
            if waited > s.startup_timeout_s:
                return Failure(
                    FailureReason.STARTUP_TIMEOUT,
                    f"no heartbeat {waited:.1f}s after (re)start > "
                    f"startup_timeout_s {s.startup_timeout_s}",
                )
            return None
        for task_id, (start_s, limit_s) in signals.tasks.items():
            hung = self.hung(task_id, start_s, limit_s, now_s)
            if hung is not None:
                return hung
        calls, rate = self.error_rate(signals, now_s)
        if calls >= s.error_min_calls and rate >= s.error_rate_threshold:
            return Failure(
                FailureReason.ERROR_RATE,
                f"error rate {rate:.2f} >= {s.error_rate_threshold} over {calls} "
                f"tasks in {s.error_window_s}s",
            )
        silent = now_s - signals.last_heartbeat_s
        if silent > s.heartbeat_timeout_s:
            return Failure(
                FailureReason.HEARTBEAT_MISSED,
                f"no heartbeat for {silent:.1f}s > heartbeat_timeout_s "
                f"{s.heartbeat_timeout_s}",
            )
        return None


# --- the cascade guard -----------------------------------------------------------------


class CascadeGuard:
    """A fleet-level breaker over restarts; see ``CascadeSpec`` for the rules.

    Use one per fleet (the share that matters is of the whole fleet). Feed it the
    number of failing and total agents with ``observe`` before each round of restarts,
    ask ``try_restart`` for each restart that is due, and report the fate of restarts
    granted while it was not CLOSED with ``probe_succeeded`` / ``probe_failed``.

    Throttle invariant: while not CLOSED, the grants in any span of ``interval_s``
    seconds never exceed the allowance (a sliding log of grant times, not a fixed
    window, so no burst straddles a window boundary).
    """

    def __init__(
        self,
        spec: CascadeSpec,
        listeners: Iterable[HealthListener] = (),
        name: str = "cascade",
    ):
        self.spec = spec
        self.name = name
        self._listeners = list(listeners)
        self.state = GuardState.CLOSED
        self._since_s = 0.0
        self._grants: deque[float] = deque()
        self._probe_successes = 0
        self._total = 0
        self.opened = 0  # times opened from CLOSED (alerts fired)
        self.granted = 0
        self.throttled = 0  # restart requests refused

    def add_listener(self, listener: HealthListener) -> None:
        self._listeners.append(listener)

    def allowance(self, now_s: float) -> int | None:
        """Restarts allowed per ``interval_s`` now; None when unlimited (CLOSED)."""
        n = self.spec.max_restarts_per_interval
        if self.state is GuardState.CLOSED:
            return None
        if self.state is GuardState.OPEN:
            return n
        intervals = min(int((now_s - self._since_s) // self.spec.interval_s), 64)
        grown = math.ceil(n * self.spec.half_open_growth**intervals)
        return min(grown, max(n, self._total))

    def observe(self, failing: int, total: int, now_s: float) -> GuardState:
        """Re-evaluate on the current number of failing agents out of ``total``."""
        self._total = total
        share = failing / total if total else 0.0
        spec = self.spec
        resume = spec.effective_resume_share
        what = f"{failing} of {total} agents failing ({share:.0%})"
        for _ in range(3):  # OPEN -> HALF_OPEN -> CLOSED may all follow from one reading
            if self.state is GuardState.CLOSED:
                if (
                    spec.enabled
                    and failing >= spec.min_failing_agents
                    and share > spec.cascade_share
                ):
                    self._transition(
                        GuardState.OPEN,
                        now_s,
                        f"{what} > cascade_share {spec.cascade_share:.0%}",
                    )
                    continue
            elif self.state is GuardState.OPEN:
                if share <= resume:
                    self._transition(
                        GuardState.HALF_OPEN, now_s, f"{what} <= resume_share {resume:.0%}"
                    )
                    continue
            elif share <= resume and (self.allowance(now_s) or 0) >= failing:
                self._transition(
                    GuardState.CLOSED,
                    now_s,
                    f"{what} <= resume_share {resume:.0%} and the allowance covers them",
                )
                continue
            break
        return self.state

    def try_restart(self, now_s: float) -> bool:
        """Take one restart permit (always granted while CLOSED)."""
        allowance = self.allowance(now_s)
        if allowance is None:
            self.granted += 1
            return True
        while self._grants and self._grants[0] <= now_s - self.spec.interval_s:
            self._grants.popleft()
        if len(self._grants) >= allowance:
            self.throttled += 1
            return False
        self._grants.append(now_s)
        self.granted += 1
        return True

    def probe_succeeded(self, now_s: float) -> None:
        """An agent restarted while the guard was not CLOSED stayed healthy."""
        if self.state is not GuardState.OPEN:
            return
        self._probe_successes += 1
        if self._probe_successes >= self.spec.probe_successes:
            self._transition(
                GuardState.HALF_OPEN,
                now_s,
                f"{self._probe_successes} restarted agents stayed healthy "
                f"for {self.spec.probe_healthy_s}s",
            )

    def probe_failed(self, now_s: float) -> None:
        """An agent restarted while the guard was not CLOSED failed again."""
        if self.state is GuardState.HALF_OPEN:
            self._transition(GuardState.OPEN, now_s, "a restarted agent failed again")
        elif self.state is GuardState.OPEN:
            self._probe_successes = 0

    def _transition(self, new: GuardState, now_s: float, reason: str) -> None:
        """The one place where the guard's state changes, with its entry actions."""
        old = self.state
        self.state = new
        self._since_s = now_s
        self._probe_successes = 0
        if new is not GuardState.CLOSED and old is GuardState.CLOSED:
            self._grants.clear()
        self._emit(
            HealthEvent(now_s, EventKind.GUARD, self.name, old.value, new.value, reason)
        )
        if old is GuardState.CLOSED:
            self.opened += 1
            self._emit(
                HealthEvent(
                    now_s,
                    EventKind.ALERT_FIRING,
                    self.name,
                    reason=f"cascade: {reason}; restarts throttled to "
                    f"{self.spec.max_restarts_per_interval} per "
                    f"{self.spec.interval_s}s",
                )
            )
        elif new is GuardState.CLOSED:
            self._emit(
                HealthEvent(
                    now_s,
                    EventKind.ALERT_RESOLVED,
                    self.name,
                    reason=f"cascade over: {reason}",
                )
            )

    def _emit(self, event: HealthEvent) -> None:
        for listener in self._listeners:
            listener.on_health_event(event)

    def snapshot(self, now_s: float) -> dict[str, object]:
        return {
            "state": self.state.value,
            "allowance_per_interval": self.allowance(now_s),
            "interval_s": self.spec.interval_s,
            "opened": self.opened,
            "granted": self.granted,
            "throttled": self.throttled,
        }


class RestartGate(Protocol):
    """What ``HealthMonitor`` asks before each restart: a ``CascadeGuard``, or a
    ``FleetGate`` standing in for a guard that lives elsewhere."""

    name: str

    @property
    def state(self) -> GuardState: ...
    def add_listener(self, listener: HealthListener) -> None: ...
    def observe(self, failing: int, total: int, now_s: float) -> GuardState: ...
    def try_restart(self, now_s: float) -> bool: ...
    def probe_succeeded(self, now_s: float) -> None: ...
    def probe_failed(self, now_s: float) -> None: ...
    def snapshot(self, now_s: float) -> dict[str, object]: ...


class FleetGate:
    """One host's side of the fleet-wide cascade guard.

    Use it as the ``guard`` of a host's ``HealthMonitor`` when the ``CascadeGuard`` that
    matters (over the whole fleet) runs elsewhere, e.g. in the controller, and is asked
    only now and then (the host's periodic report). The host sends ``report()``; the
    guard's owner answers with a verdict (its state and how many restarts it granted
    this host), which the host passes to ``apply``.

    Decision per restart:
    - the verdict is fresh (younger than ``stale_after_s``), the fleet guard is CLOSED
      and this host's own share of failing agents is within ``cascade_share``: restart;
    - otherwise, with a fresh verdict: only on a permit granted by the fleet guard (the
      host asks for as many as it has restarts due, in its next report);
    - no fresh verdict (the owner is unreachable, or none exists): a local
      ``CascadeGuard`` over this host's agents decides alone, so a host cut off from
      its controller still never restarts en masse.

    A host whose own share is high holds its restarts until the fleet guard has seen
    them: the fleet guard learns of a mass failure one report later than the host, and
    must not find the restarts already done.
    """

    def __init__(self, spec: CascadeSpec, stale_after_s: float, name: str = "fleet-gate"):
        self.spec = spec
        self.name = name
        self.stale_after_s = stale_after_s
        self.local = CascadeGuard(spec, name=f"{name}:local")
        self.fleet_state: GuardState | None = None
        self._verdict_at_s: float | None = None
        self._permits = 0
        self._suspect = False  # this host's own failing share is above cascade_share
        self._probe_ok = 0
        self._probe_failed = 0
        self.granted = 0
        self.throttled = 0

    def add_listener(self, listener: HealthListener) -> None:
        """Nothing to tell: the fleet guard's owner raises the alerts."""

    def fresh(self, now_s: float) -> bool:
        return (
            self._verdict_at_s is not None and now_s - self._verdict_at_s <= self.stale_after_s
        )

    @property
    def state(self) -> GuardState:
        if self.fleet_state is not None and self.fleet_state is not GuardState.CLOSED:
            return self.fleet_state
        return self.local.state

    def observe(self, failing: int, total: int, now_s: float) -> GuardState:
        spec = self.spec
        self._suspect = (
            spec.enabled
            and failing >= spec.min_failing_agents
            and total > 0
            and failing / total > spec.cascade_share
        )
        self.local.observe(failing, total, now_s)
        return self.state

    def try_restart(self, now_s: float) -> bool:
        if not self.fresh(now_s):
            ok = self.local.try_restart(now_s)
        elif self.fleet_state is GuardState.CLOSED and not self._suspect:
            ok = True
        elif self._permits > 0:
            self._permits -= 1
            ok = True
        else:
            ok = False
        if ok:
            self.granted += 1
        else:
            self.throttled += 1
        return ok

    def probe_succeeded(self, now_s: float) -> None:
        self._probe_ok += 1
        self.local.probe_succeeded(now_s)

    def probe_failed(self, now_s: float) -> None:
        self._probe_failed += 1
        self.local.probe_failed(now_s)

    def report(self, failing: int, total: int, restarts_due: int) -> dict[str, int]:
        """What to send the fleet guard's owner; probe fates are sent once."""
        out = {
            "failing": failing,
            "total": total,
            "restarts_wanted": restarts_due,
            "probe_ok": self._probe_ok,
            "probe_failed": self._probe_failed,
        }
        self._probe_ok = self._probe_failed = 0
        return out

    def apply(self, state: GuardState | str, permits: int, now_s: float) -> None:
        """The owner's verdict: the fleet guard's state and this host's permits (they
        replace unused ones, so permits never pile up beyond one grant)."""
        self.fleet_state = GuardState(state)
        self._permits = max(0, permits)
        self._verdict_at_s = now_s

    def snapshot(self, now_s: float) -> dict[str, object]:
        return {
            "state": self.state.value,
            "fleet_state": self.fleet_state.value if self.fleet_state else None,
            "fresh": self.fresh(now_s),
            "permits": self._permits,
            "local": self.local.snapshot(now_s),
            "granted": self.granted,
            "throttled": self.throttled,
        }


# --- the monitor -----------------------------------------------------------------------


@dataclass(slots=True)
class AgentHealth:
    """The monitor's record of one agent."""

    agent_id: str
    pool: str
    state: AgentState
    since_s: float  # when it entered ``state``
    signals: AgentSignals
    failures: int = 0  # consecutive failures; drives the backoff and ejection
    restarts: int = 0
    last_failure: Failure | None = None
    next_restart_s: float | None = None
    healthy_since_s: float | None = None
    probe: bool = False  # restarted while the guard was not CLOSED, fate not yet known


@dataclass(frozen=True, slots=True)
class FailureRecord:
    at_s: float
    agent_id: str
    pool: str
    reason: str
    detail: str


class HealthMonitor:
    """Health state of every logical agent of a fleet, and what to do about it.

    Feed it signals (``heartbeat``, ``task_started``, ``task_finished``,
    ``report_failure``) and membership (``add_agent``, ``remove_agent``, ``reinstate``);
    call ``tick()`` at least every ``heartbeat_interval_s`` and apply the actions it
    returns, in order. Actions caused by a signal (an error-rate failure, a recovery)
    are queued and returned by the next ``tick``, so call it right after a batch of
    signals to remove a failed agent from service at once. ``clock`` returns monotonic
    seconds; ``rng`` jitters the restart backoff.
    """

    def __init__(
        self,
        spec: HealthSpec,
        clock: Clock,
        rng: random.Random,
        listeners: Iterable[HealthListener] = (),
        name: str = "fleet",
        guard: RestartGate | None = None,
    ):
        self.spec = spec
        self.name = name
        self._clock = clock
        self._rng = rng
        self._listeners = list(listeners)
        self.detector = FailureDetector(spec)
        self.guard: RestartGate = (
            guard
            if guard is not None
            else CascadeGuard(spec.cascade, self._listeners, name=f"{name}:cascade")
        )
        self._agents: dict[str, AgentHealth] = {}
        self._by_state: dict[AgentState, int] = dict.fromkeys(AgentState, 0)
        self._probing: set[str] = set()  # agents restarted as the guard's probes
        self._outbox: list[HealthAction] = []
        self.failures: deque[FailureRecord] = deque(maxlen=spec.failure_log_size)
        self.failure_counts: dict[str, int] = {}  # failures by reason, since creation
        self.ignored_signals = 0  # task signals for agents the monitor does not know

    def add_listener(self, listener: HealthListener) -> None:
        self._listeners.append(listener)
        self.guard.add_listener(listener)

    # -- membership ---------------------------------------------------------------------
    def add_agent(self, agent_id: str, pool: str = "default") -> None:
        """A new agent was started; it is in service once it reports a heartbeat."""
        if agent_id in self._agents:
            return
        now = self._clock()
        self._agents[agent_id] = AgentHealth(
            agent_id, pool, S.STARTING, now, self.detector.new_signals(now)
        )
        self._by_state[S.STARTING] += 1

    def remove_agent(self, agent_id: str) -> None:
        """The agent is gone on purpose (scaled down, drained, retired): forget it."""
        a = self._agents.pop(agent_id, None)
        if a is not None:
            self._by_state[a.state] -= 1
            self._probing.discard(agent_id)

    def reinstate(self, agent_id: str) -> None:
        """An operator gives an ejected agent another chance (it starts afresh)."""
        a = self._agents[agent_id]
        now = self._clock()
        self._transition(a, S.STARTING, now, "reinstated")
        a.failures = 0
        a.signals = self.detector.new_signals(now)

    # -- signals --------------------------------------------------------------------------
    def heartbeat(self, agent_id: str, pool: str = "default") -> None:
        """The agent is alive; an unknown agent announces itself this way."""
        now = self._clock()
        a = self._agents.get(agent_id)
        if a is None:
            self.add_agent(agent_id, pool)
            a = self._agents[agent_id]
        a.signals.last_heartbeat_s = now
        if a.state in (S.STARTING, S.RESTARTING):
            self._admit(
                a,
                now,
                "first heartbeat after start"
                if a.state is S.STARTING
                else f"restart {a.restarts} reported healthy",
            )
        elif (
            a.state is S.UNHEALTHY
            and self.spec.recover_on_heartbeat
            and a.last_failure is not None
            and a.last_failure.reason is FailureReason.HEARTBEAT_MISSED
        ):
            a.next_restart_s = None
            self._admit(a, now, "heartbeat resumed before the restart")

    def task_started(self, agent_id: str, task_id: str, limit_s: float | None = None) -> None:
        """The agent began ``task_id``, which may run ``limit_s`` seconds (None: the
        spec's ``default_task_limit_s``)."""
        a = self._agents.get(agent_id)
        if a is None:
            self.ignored_signals += 1
            return
        limit = self.spec.default_task_limit_s if limit_s is None else limit_s
        a.signals.tasks[task_id] = (self._clock(), limit)

    def task_finished(self, agent_id: str, task_id: str, ok: bool) -> None:
        """The agent finished ``task_id``; failures count towards its error rate."""
        a = self._agents.get(agent_id)
        if a is None:
            self.ignored_signals += 1
            return
        now = self._clock()
        a.signals.tasks.pop(task_id, None)
        if a.state is not S.HEALTHY:
            return  # a straggler from before it was taken out of service
        self.detector.record_outcome(a.signals, now, ok)
        if not ok:
            failure = self.detector.check(a.signals, now)
            if failure is not None and failure.reason is FailureReason.ERROR_RATE:
                self._fail(a, failure, now)

    def task_outcomes(self, agent_id: str, ok: int, failed: int) -> bool:
        """``ok`` and ``failed`` tasks finished (counts, for a runtime that tallies
        outcomes on its hot path and hands them over in bulk). Returns True when this
        failed the agent (error rate): ``take_actions()`` then has its REMOVE."""
        a = self._agents.get(agent_id)
        if a is None:
            self.ignored_signals += 1
            return False
        if a.state is not S.HEALTHY or not (ok or failed):
            return False
        now = self._clock()
        assert a.signals.outcomes is not None
        a.signals.outcomes.add(now, ok + failed, failed)
        if failed:
            failure = self.detector.check(a.signals, now)
            if failure is not None and failure.reason is FailureReason.ERROR_RATE:
                self._fail(a, failure, now)
                return True
        return False

    def take_actions(self) -> list[HealthAction]:
        """The actions queued by signals since the last tick, without a tick (O(1)):
        apply them to take a failed agent out of service at once."""
        out, self._outbox = self._outbox, []
        return out

    def report_failure(
        self, agent_id: str, detail: str, reason: FailureReason = FailureReason.CRASHED
    ) -> None:
        """The host saw the agent die (or another fatal fault)."""
        a = self._agents.get(agent_id)
        if a is None:
            self.ignored_signals += 1
            return
        self._fail(a, Failure(reason, detail), self._clock())

    # -- decisions ------------------------------------------------------------------------
    def tick(self) -> list[HealthAction]:
        """Detect failures, update the cascade guard, schedule restarts; return the
        actions queued since the last tick."""
        now = self._clock()
        spec = self.spec
        self.settle_probes()
        for a in list(self._agents.values()):
            if a.state is S.HEALTHY:
                assert a.healthy_since_s is not None
                if a.failures and now - a.healthy_since_s >= spec.restart.reset_after_s:
                    a.failures = 0
            if a.state in (S.HEALTHY, S.STARTING, S.RESTARTING):
                failure = self.detector.check(a.signals, now)
                if failure is not None:
                    self._fail(a, failure, now)
        self.observe_guard()
        self._restart_due(now)
        out, self._outbox = self._outbox, []
        return out

    def observe_guard(self) -> GuardState:
        """Tell the cascade guard how many agents are failing now (O(1))."""
        failing, total = self.failing_and_total()
        return self.guard.observe(failing, total, self._clock())

    def settle_probes(self) -> None:
        """Probes (agents restarted while the guard was not closed) that stayed healthy
        for ``probe_healthy_s`` succeed (O(probes))."""
        if not self._probing:
            return
        now = self._clock()
        for agent_id in list(self._probing):
            a = self._agents[agent_id]
            if (
                a.state is S.HEALTHY
                and a.healthy_since_s is not None
                and now - a.healthy_since_s >= self.spec.cascade.probe_healthy_s
            ):
                self._end_probe(a)
                self.guard.probe_succeeded(now)

    def restart(self, agent_id: str, ignore_backoff: bool = False) -> bool:
        """Restart one agent whose backoff has passed (or, with ``ignore_backoff``, one
        whose driver chose the delay), if the guard grants a permit; the RESTART action
        is queued (``take_actions``). False: not unhealthy, not due, or refused."""
        a = self._agents.get(agent_id)
        now = self._clock()
        if (
            a is None
            or a.state is not S.UNHEALTHY
            or a.next_restart_s is None
            or (a.next_restart_s > now and not ignore_backoff)
            or not self.guard.try_restart(now)
        ):
            return False
        self._start_restart(a, now)
        return True

    def due_restarts(self) -> int:
        """Agents whose backoff has passed and that wait for a restart permit."""
        now = self._clock()
        return sum(
            1
            for a in self._agents.values()
            if a.state is S.UNHEALTHY
            and a.next_restart_s is not None
            and a.next_restart_s <= now
        )

    def _restart_due(self, now: float) -> None:
        due = sorted(
            (
                a
                for a in self._agents.values()
                if a.state is S.UNHEALTHY
                and a.next_restart_s is not None
                and a.next_restart_s <= now
            ),
            key=lambda a: (a.next_restart_s, a.agent_id),
        )
        held = 0
        for i, a in enumerate(due):
            if not self.guard.try_restart(now):
                held = len(due) - i  # the rest stay UNHEALTHY and are asked again next tick
                break
            self._start_restart(a, now)
        if held:
            self._emit(
                HealthEvent(
                    now,
                    EventKind.RESTART_THROTTLED,
                    self.guard.name,
                    reason=f"{held} restarts held back, guard {self.guard.state.value}",
                )
            )

    def _start_restart(self, a: AgentHealth, now: float) -> None:
        """A permit was granted: the agent restarts (a probe if the guard is not closed)."""
        a.restarts += 1
        a.next_restart_s = None
        if self.guard.state is not GuardState.CLOSED:
            a.probe = True
            self._probing.add(a.agent_id)
        a.signals = self.detector.new_signals(now)
        reason = a.last_failure.reason.value if a.last_failure else "restart"
        self._transition(a, S.RESTARTING, now, f"restart {a.restarts} after {reason}")
        self._outbox.append(HealthAction(ActionKind.RESTART, a.agent_id, reason, a.restarts))

    def _end_probe(self, a: AgentHealth) -> None:
        a.probe = False
        self._probing.discard(a.agent_id)

    def _fail(self, a: AgentHealth, failure: Failure, now: float) -> None:
        if a.state in (S.UNHEALTHY, S.EJECTED):
            return
        if a.probe:
            self._end_probe(a)
            self.guard.probe_failed(now)
        if (
            a.healthy_since_s is not None
            and now - a.healthy_since_s >= self.spec.restart.reset_after_s
        ):
            a.failures = 0
        a.failures += 1
        a.last_failure = failure
        a.signals.tasks.clear()
        self.failures.append(
            FailureRecord(now, a.agent_id, a.pool, failure.reason.value, failure.detail)
        )
        key = failure.reason.value
        self.failure_counts[key] = self.failure_counts.get(key, 0) + 1
        self._transition(a, S.UNHEALTHY, now, f"{failure.reason.value}: {failure.detail}")
        self._outbox.append(HealthAction(ActionKind.REMOVE, a.agent_id, failure.reason.value))
        limit = self.spec.restart.eject_after_failures
        if limit is not None and a.failures >= limit:
            self._transition(
                a,
                S.EJECTED,
                now,
                f"{a.failures} consecutive failures >= eject_after_failures {limit}",
            )
            self._outbox.append(
                HealthAction(ActionKind.EJECT, a.agent_id, failure.reason.value)
            )
        else:
            a.next_restart_s = now + backoff_s(self.spec.restart, a.failures, self._rng)

    def _admit(self, a: AgentHealth, now: float, reason: str) -> None:
        self._transition(a, S.HEALTHY, now, reason)
        self._outbox.append(HealthAction(ActionKind.ADMIT, a.agent_id, reason))

    def _transition(self, a: AgentHealth, new: AgentState, now: float, reason: str) -> None:
        """The one place where an agent's state changes."""
        old = a.state
        if new not in TRANSITIONS[old]:
            raise ValueError(f"agent {a.agent_id}: no transition {old.value} -> {new.value}")
        a.state = new
        self._by_state[old] -= 1
        self._by_state[new] += 1
        a.since_s = now
        a.healthy_since_s = now if new is S.HEALTHY else None
        self._emit(HealthEvent(now, EventKind.AGENT, a.agent_id, old.value, new.value, reason))

    def _emit(self, event: HealthEvent) -> None:
        for listener in self._listeners:
            listener.on_health_event(event)

    # -- views ------------------------------------------------------------------------------
    def failing_and_total(self) -> tuple[int, int]:
        """Agents failing (unhealthy or restarting) and agents known (O(1))."""
        by = self._by_state
        return sum(by[s] for s in FAILING_STATES), len(self._agents)

    _failing_and_total = failing_and_total

    def state(self, agent_id: str) -> AgentState:
        return self._agents[agent_id].state

    def agent(self, agent_id: str) -> AgentHealth:
        return self._agents[agent_id]

    def in_service(self, agent_id: str) -> bool:
        a = self._agents.get(agent_id)
        return a is not None and a.state is S.HEALTHY

    def agent_ids(self, state: AgentState | None = None) -> list[str]:
        return [a.agent_id for a in self._agents.values() if state is None or a.state is state]

    def counts(self, pool: str | None = None) -> dict[str, int]:
        """Agents per state (of one pool, or of the fleet)."""
        if pool is None:
            return {s.value: self._by_state[s] for s in AgentState}
        out = {s.value: 0 for s in AgentState}
        for a in self._agents.values():
            if pool is None or a.pool == pool:
                out[a.state.value] += 1
        return out

    def snapshot(self, last_failures: int = 10) -> dict[str, object]:
        """Per-pool counts, the guard and the last failures, for ``fleet status``."""
        now = self._clock()
        pools = sorted({a.pool for a in self._agents.values()})
        failing, total = self._failing_and_total()
        return {
            "agents": total,
            "failing": failing,
            "by_state": self.counts(),
            "pools": {p: self.counts(p) for p in pools},
            "guard": self.guard.snapshot(now),
            "last_failures": [
                {
                    "at_s": f.at_s,
                    "agent_id": f.agent_id,
                    "pool": f.pool,
                    "reason": f.reason,
                    "detail": f.detail,
                }
                for f in list(self.failures)[-last_failures:]
            ],
        }
