"""Circuit breakers and the fleet-wide ejection governor.

A ``CircuitBreaker`` guards one agent (or host) or one downstream dependency. It is an
explicit state machine::

    CLOSED --(window failure or slow-call rate >= threshold, >= min_calls)--> OPEN
    OPEN --(open duration elapsed)--> HALF_OPEN
    HALF_OPEN --(half_open_probe_calls successes)--> CLOSED
    HALF_OPEN --(a probe fails, or probes unfinished after half_open_max_wait_s)--> OPEN

Every transition goes through ``CircuitBreaker._transition`` and is published as a
``BreakerEvent`` to the listeners. Time comes from an injected ``clock`` (seconds,
monotonic); OPEN -> HALF_OPEN happens lazily, the next time the breaker is asked, so no
timer is needed.

A ``BreakerRegistry`` owns the breakers of one pool: one per agent and one per
dependency. For agent breakers it is the *ejection governor*: a breaker that wants to
open while the cap of ejected agents is reached stays closed (recorded as an
``EJECTION_DENIED`` event and in ``denied_trips``), and when too few agents are healthy
it enters panic mode and routes to every agent. The same ``TimeBuckets`` window also
backs the router's success-rate tracker and the retry budget.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, Protocol, TypeVar

from fleet.policy.backoff import backoff_s
from fleet.spec.resilience import BreakerSpec, EjectionSpec, ResilienceSpec, WindowKind

Clock = Callable[[], float]

DEFAULT_TIME_BUCKETS = 10
DEFAULT_EVENT_LOG_SIZE = 1_000


# --- sliding windows -----------------------------------------------------------------


class TimeBuckets:
    """Sums of ``width`` counters over the last ``window_s`` seconds.

    Use it for rates over a time window at any call rate in O(buckets) memory: the
    window is cut into ``buckets`` slots of ``window_s / buckets`` seconds and the oldest
    slot is dropped whole, so the sums cover between ``window_s - window_s / buckets``
    and ``window_s`` seconds. Times are seconds on a monotonic clock; a time earlier
    than the newest slot is counted in the newest slot.
    """

    __slots__ = ("_slot_s", "_slots", "_sums", "buckets", "width", "window_s")

    def __init__(self, window_s: float, width: int, buckets: int = DEFAULT_TIME_BUCKETS):
        if window_s <= 0 or width < 1 or buckets < 1:
            raise ValueError(
                f"need window_s > 0, width >= 1, buckets >= 1; got "
                f"{window_s}, {width}, {buckets}"
            )
        self.window_s = window_s
        self.width = width
        self.buckets = buckets
        self._slot_s = window_s / buckets
        self._slots: deque[list[float]] = deque()  # [slot index, counter 0, counter 1, ...]
        self._sums = [0.0] * width

    def _expire(self, now_s: float) -> int:
        current = math.floor(now_s / self._slot_s)
        while self._slots and self._slots[0][0] <= current - self.buckets:
            old = self._slots.popleft()
            for k in range(self.width):
                self._sums[k] -= old[k + 1]
        if not self._slots:
            self._sums = [0.0] * self.width  # no float drift survives an empty window
        return current

    def add(self, now_s: float, *deltas: float) -> None:
        """Add ``deltas`` (one per counter, missing ones are 0) at time ``now_s``."""
        current = self._expire(now_s)
        if not self._slots or self._slots[-1][0] < current:
            self._slots.append([current] + [0.0] * self.width)
        slot = self._slots[-1]
        for k, d in enumerate(deltas):
            slot[k + 1] += d
            self._sums[k] += d

    def sums(self, now_s: float) -> tuple[float, ...]:
        """The counters summed over the window ending at ``now_s``."""
        self._expire(now_s)
        return tuple(self._sums)

    def clear(self) -> None:
        self._slots.clear()
        self._sums = [0.0] * self.width


class WindowTotals(NamedTuple):
    """Calls in a breaker's window, and how many of them failed or were slow. (A
    named tuple: one is built per call that is not a fast success, and a frozen
    dataclass costs five times as much to build.)"""

    calls: int
    failures: int
    slow: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_rate(self) -> float:
        return self.slow / self.calls if self.calls else 0.0


class CallWindow(Protocol):
    def record(self, now_s: float, failed: bool, slow: bool) -> None: ...
    def totals(self, now_s: float) -> WindowTotals: ...
    def clear(self) -> None: ...


class CountWindow:
    """The outcomes of the last ``size`` calls, with running totals (O(1) per call)."""

    def __init__(self, size: int):
        self._calls: deque[tuple[bool, bool]] = deque(maxlen=size)
        self._failures = 0
        self._slow = 0

    def record(self, now_s: float, failed: bool, slow: bool) -> None:
        if len(self._calls) == self._calls.maxlen:
            old_failed, old_slow = self._calls[0]
            self._failures -= old_failed
            self._slow -= old_slow
        self._calls.append((failed, slow))
        self._failures += failed
        self._slow += slow

    def totals(self, now_s: float) -> WindowTotals:
        return WindowTotals(len(self._calls), self._failures, self._slow)

    def clear(self) -> None:
        self._calls.clear()
        self._failures = self._slow = 0


class TimeWindow:
    """The outcomes of the calls of the last ``window_s`` seconds."""

    def __init__(self, window_s: float, buckets: int = DEFAULT_TIME_BUCKETS):
        self._b = TimeBuckets(window_s, 3, buckets)

    def record(self, now_s: float, failed: bool, slow: bool) -> None:
        self._b.add(now_s, 1, failed, slow)

    def totals(self, now_s: float) -> WindowTotals:
        calls, failures, slow = self._b.sums(now_s)
        return WindowTotals(round(calls), round(failures), round(slow))

    def clear(self) -> None:
        self._b.clear()


def make_window(spec: BreakerSpec) -> CallWindow:
    if spec.window is WindowKind.TIME:
        return TimeWindow(spec.window_s)
    return CountWindow(spec.window_calls)


# --- states and events -----------------------------------------------------------------


class BreakerState(str, Enum):
    CLOSED = "closed"  # calls pass; outcomes fill the window
    OPEN = "open"  # calls are refused until the open duration has passed
    HALF_OPEN = "half_open"  # a few probe calls pass; their outcome decides


class EventKind(str, Enum):
    TRANSITION = "transition"
    EJECTION_DENIED = "ejection_denied"  # wanted to open, the ejection cap said no
    PANIC_START = "panic_start"
    PANIC_END = "panic_end"


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """Something a breaker or the governor did, for status, metrics and alerts."""

    at_s: float
    name: str  # the breaker's name, or the registry's for panic events
    kind: EventKind
    old: BreakerState | None = None
    new: BreakerState | None = None
    reason: str = ""
    open_until_s: float | None = None


class BreakerListener(Protocol):
    """Observer of breaker events (status page, metrics exporter, alerting, tests)."""

    def on_breaker_event(self, event: BreakerEvent) -> None: ...


class BreakerEventLog:
    """A listener keeping the last ``size`` events and a count per kind and new state."""

    def __init__(self, size: int = DEFAULT_EVENT_LOG_SIZE):
        self.events: deque[BreakerEvent] = deque(maxlen=size)
        self.counts: dict[str, int] = {}

    def on_breaker_event(self, event: BreakerEvent) -> None:
        self.events.append(event)
        key = (
            event.kind.value if event.new is None else f"{event.kind.value}:{event.new.value}"
        )
        self.counts[key] = self.counts.get(key, 0) + 1


class OpenGate(Protocol):
    """Asked before a breaker opens on its own; False keeps it closed."""

    def may_open(self, breaker: CircuitBreaker) -> bool: ...


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    name: str
    state: BreakerState
    calls: int
    failure_rate: float
    slow_rate: float
    trips: int
    denied_trips: int
    open_until_s: float | None


# --- the breaker -----------------------------------------------------------------------


class CircuitBreaker:
    """One circuit breaker; see the module docstring for its states.

    Use ``try_acquire()`` before each call (False: do not call), ``release()`` if an
    acquired call is not made after all, and ``record(ok, latency_s)`` after each call.
    Outcomes recorded while OPEN are ignored (they belong to calls started before it
    opened); outcomes recorded while HALF_OPEN are taken as the probes' outcomes.
    """

    def __init__(
        self,
        name: str,
        spec: BreakerSpec,
        clock: Clock,
        listeners: Iterable[BreakerListener] = (),
        gate: OpenGate | None = None,
    ):
        self.name = name
        self.spec = spec
        self._open_backoff = spec.open_backoff
        self._clock = clock
        self._listeners = list(listeners)
        self._gate = gate
        self._window = make_window(spec)
        self._state = BreakerState.CLOSED
        self.trips = 0  # consecutive trips, sets the open duration
        self.denied_trips = 0
        self._denied = False  # inside a run of denied trips (one event per run)
        self._last_trip_s: float | None = None
        self._open_until_s: float | None = None
        self._probes_started = 0
        self._probe_successes = 0
        self._probe_deadline_s: float | None = None

    def add_listener(self, listener: BreakerListener) -> None:
        self._listeners.append(listener)

    # -- queries --------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        self._advance(self._clock())
        return self._state

    @property
    def open_until_s(self) -> float | None:
        return self._open_until_s if self.state is BreakerState.OPEN else None

    def allows(self) -> bool:
        """Whether ``try_acquire`` would succeed now (consumes nothing)."""
        state = self.state
        if state is BreakerState.CLOSED or not self.spec.enabled:
            return True
        if state is BreakerState.HALF_OPEN:
            return self._probes_started < self.spec.half_open_probe_calls
        return False

    def open_duration_s(self, trips: int) -> float:
        """How long the ``trips``-th consecutive trip keeps the breaker open (seconds):
        fleet's backoff rule over ``spec.open_backoff`` (no jitter, so no rng)."""
        return backoff_s(self._open_backoff, max(trips, 1), None)

    def snapshot(self) -> BreakerSnapshot:
        now = self._clock()
        self._advance(now)
        t = self._window.totals(now)
        return BreakerSnapshot(
            self.name,
            self._state,
            t.calls,
            t.failure_rate,
            t.slow_rate,
            self.trips,
            self.denied_trips,
            self._open_until_s if self._state is BreakerState.OPEN else None,
        )

    # -- calls ----------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Permission for one call; in HALF_OPEN this takes one of the probe permits."""
        if not self.spec.enabled:
            return True
        now = self._clock()
        self._advance(now)
        if self._state is BreakerState.CLOSED:
            return True
        if (
            self._state is BreakerState.HALF_OPEN
            and self._probes_started < self.spec.half_open_probe_calls
        ):
            if self._probes_started == 0:
                self._probe_deadline_s = now + self.spec.half_open_max_wait_s
            self._probes_started += 1
            return True
        return False

    def release(self) -> None:
        """Give back a permit whose call was not made (only probe permits are counted)."""
        if self._state is BreakerState.HALF_OPEN and self._probes_started > 0:
            self._probes_started -= 1

    def record(self, ok: bool, latency_s: float | None = None) -> None:
        """The outcome of one call; ``latency_s`` (seconds) decides whether it was slow."""
        if not self.spec.enabled:
            return
        now = self._clock()
        self._advance(now)
        slow = latency_s is not None and latency_s >= self.spec.slow_call_duration_s
        if self._state is BreakerState.CLOSED:
            self._window.record(now, not ok, slow)
            self._evaluate(now)
        elif self._state is BreakerState.HALF_OPEN:
            if not ok or slow:
                why = (
                    "probe failed"
                    if not ok
                    else f"probe slower than {self.spec.slow_call_duration_s}s"
                )
                self._transition(BreakerState.OPEN, now, why)
            else:
                self._probe_successes += 1
                if self._probe_successes >= self.spec.half_open_probe_calls:
                    self._transition(
                        BreakerState.CLOSED,
                        now,
                        f"{self._probe_successes} probe calls succeeded",
                    )

    def record_success(self, latency_s: float | None = None) -> None:
        self.record(True, latency_s)

    def record_failure(self, latency_s: float | None = None) -> None:
        self.record(False, latency_s)

    def force_open(self, reason: str) -> None:
        """Open now, bypassing thresholds and the ejection cap (an operator or a health
        check that knows better)."""
        now = self._clock()
        self._advance(now)
        if self._state is not BreakerState.OPEN:
            self._transition(BreakerState.OPEN, now, f"forced: {reason}")

    def reset(self, reason: str = "reset") -> None:
        """Close now and forget the window and the trip count."""
        now = self._clock()
        self._advance(now)
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED, now, reason)
        self.trips = 0
        self._window.clear()

    # -- the state machine ------------------------------------------------------------
    def _evaluate(self, now: float) -> None:
        t = self._window.totals(now)
        s = self.spec
        why = None
        if t.calls >= s.min_calls:
            if t.failure_rate >= s.failure_rate_threshold:
                why = (
                    f"failure rate {t.failure_rate:.2f} >= {s.failure_rate_threshold} "
                    f"over {t.calls} calls"
                )
            elif t.slow_rate >= s.slow_call_rate_threshold:
                why = (
                    f"slow-call rate {t.slow_rate:.2f} >= {s.slow_call_rate_threshold} "
                    f"over {t.calls} calls"
                )
        if why is None:
            self._denied = False
            return
        if self._gate is not None and not self._gate.may_open(self):
            self.denied_trips += 1
            if not self._denied:  # one event per run of refusals, not one per call
                self._denied = True
                self._emit(
                    BreakerEvent(
                        now,
                        self.name,
                        EventKind.EJECTION_DENIED,
                        BreakerState.CLOSED,
                        BreakerState.CLOSED,
                        f"{why}; ejection cap reached",
                    )
                )
            return
        self._transition(BreakerState.OPEN, now, why)

    def _advance(self, now: float) -> None:
        """Apply the transitions that the passing of time alone causes."""
        if (
            self._state is BreakerState.OPEN
            and self._open_until_s is not None
            and now >= self._open_until_s
        ):
            self._transition(BreakerState.HALF_OPEN, now, "open duration elapsed")
        if (
            self._state is BreakerState.HALF_OPEN
            and self._probe_deadline_s is not None
            and now >= self._probe_deadline_s
        ):
            self._transition(
                BreakerState.OPEN,
                now,
                f"probes unfinished after {self.spec.half_open_max_wait_s}s",
            )

    def _transition(self, new: BreakerState, now: float, reason: str) -> None:
        """The one place where the state changes, with each state's entry actions."""
        old = self._state
        self._state = new
        self._denied = False
        self._probes_started = self._probe_successes = 0
        self._probe_deadline_s = None
        if new is BreakerState.OPEN:
            # A reopen from HALF_OPEN always counts as a repeat; a trip from CLOSED only
            # if the previous trip is recent, so an agent that fails once a day is not
            # punished with the maximum open duration.
            recent = (
                self._last_trip_s is not None
                and now - self._last_trip_s <= self.spec.trip_memory_s
            )
            self.trips = self.trips + 1 if (old is BreakerState.HALF_OPEN or recent) else 1
            self._last_trip_s = now
            self._open_until_s = now + self.open_duration_s(self.trips)
            self._window.clear()
        elif new is BreakerState.CLOSED:
            self._open_until_s = None
            self._window.clear()
        self._emit(
            BreakerEvent(
                now,
                self.name,
                EventKind.TRANSITION,
                old,
                new,
                reason,
                self._open_until_s if new is BreakerState.OPEN else None,
            )
        )

    def _emit(self, event: BreakerEvent) -> None:
        for listener in self._listeners:
            listener.on_breaker_event(event)


# --- the registry and ejection governor ------------------------------------------------


class HasId(Protocol):
    @property
    def id(self) -> str: ...


C = TypeVar("C", bound=HasId)


@dataclass(frozen=True, slots=True)
class Routable(Generic[C]):
    """The candidates a router may use now, and whether panic mode chose them."""

    candidates: list[C]
    panic: bool
    healthy: int
    total: int


class BreakerRegistry:
    """The breakers of one pool: per agent (capped, with panic mode) and per dependency.

    Use one per pool, in the component that routes (for agent breakers) or calls the
    dependency (for dependency breakers). Feed it with ``record`` / ``record_dependency``
    after every call; before routing, narrow the candidates with ``routable`` and take
    the chosen agent's permit with ``acquire``.

    Ejection cap: at most ``max(1, floor(max_ejected_share * agents))`` agent breakers
    are not CLOSED at once; an agent breaker that would open beyond that stays closed.
    Panic: when the share of candidates that are healthy (breaker CLOSED and not listed
    unhealthy by the caller) falls below ``panic_threshold``, ``routable`` returns every
    candidate, because concentrating all traffic on the few healthy ones would overload
    them too.
    """

    def __init__(
        self,
        spec: ResilienceSpec,
        clock: Clock,
        listeners: Iterable[BreakerListener] = (),
        name: str = "pool",
    ):
        self.spec = spec
        self.name = name
        self._clock = clock
        self._listeners = list(listeners)
        self._agents: dict[str, CircuitBreaker] = {}
        self._deps: dict[str, CircuitBreaker] = {}
        self._ejected: set[str] = set()
        self.panic = False
        self.panics = 0

    @property
    def ejection(self) -> EjectionSpec:
        return self.spec.ejection

    def add_listener(self, listener: BreakerListener) -> None:
        self._listeners.append(listener)
        for b in (*self._agents.values(), *self._deps.values()):
            b.add_listener(listener)

    # -- population ---------------------------------------------------------------------
    def agent(self, agent_id: str) -> CircuitBreaker:
        """The breaker of ``agent_id``, created (closed) on first use."""
        b = self._agents.get(agent_id)
        if b is None:
            b = CircuitBreaker(
                f"agent:{agent_id}",
                self.spec.agent_breaker,
                self._clock,
                [_EjectionTracker(self, agent_id), *self._listeners],
                gate=self,
            )
            self._agents[agent_id] = b
        return b

    def dependency(self, name: str) -> CircuitBreaker:
        """The breaker of downstream dependency ``name`` (never capped)."""
        b = self._deps.get(name)
        if b is None:
            b = CircuitBreaker(
                f"dependency:{name}",
                self.spec.breaker_for_dependency(name),
                self._clock,
                self._listeners,
            )
            self._deps[name] = b
        return b

    def sync_agents(self, agent_ids: Iterable[str]) -> None:
        """Make the registry's population exactly ``agent_ids`` (joins and leaves)."""
        keep = set(agent_ids)
        for gone in [a for a in self._agents if a not in keep]:
            self.remove_agent(gone)
        for a in keep:
            self.agent(a)

    def remove_agent(self, agent_id: str) -> None:
        self._agents.pop(agent_id, None)
        self._ejected.discard(agent_id)

    @property
    def agents(self) -> int:
        return len(self._agents)

    @property
    def ejected(self) -> frozenset[str]:
        return frozenset(self._ejected)

    @property
    def max_ejected(self) -> int:
        """How many agents may be ejected at once (at least one, so a small pool can
        still eject its one bad agent)."""
        return max(1, math.floor(self.ejection.max_ejected_share * len(self._agents)))

    def may_open(self, breaker: CircuitBreaker) -> bool:
        """The ejection cap (``OpenGate``): room for one more ejected agent?"""
        return len(self._ejected) < self.max_ejected

    def _on_agent_transition(self, agent_id: str, event: BreakerEvent) -> None:
        if event.new is BreakerState.CLOSED:
            self._ejected.discard(agent_id)
        elif agent_id in self._agents:
            self._ejected.add(agent_id)

    # -- the calls ------------------------------------------------------------------------
    def record(self, agent_id: str, ok: bool, latency_s: float | None = None) -> None:
        """The outcome of one task on ``agent_id`` (latency in seconds)."""
        self.agent(agent_id).record(ok, latency_s)

    def record_dependency(self, name: str, ok: bool, latency_s: float | None = None) -> None:
        self.dependency(name).record(ok, latency_s)

    def acquire(self, agent_id: str) -> bool:
        """Take the permit for one task on ``agent_id`` (always granted in panic mode)."""
        granted = self.agent(agent_id).try_acquire()
        return granted or self.panic

    def routable(
        self, candidates: Sequence[C], unhealthy: Collection[str] = ()
    ) -> Routable[C]:
        """The candidates a router may pick from now.

        Keeps candidates whose breaker is CLOSED, or HALF_OPEN with a probe permit left,
        and that are not in ``unhealthy`` (e.g. failed health checks). Enters panic mode,
        returning every candidate, when the healthy share is below ``panic_threshold``.
        """
        now = self._clock()
        keep: list[C] = []
        healthy = 0
        for c in candidates:
            b = self.agent(c.id)
            if c.id in unhealthy:
                continue
            if b.state is BreakerState.CLOSED or not b.spec.enabled:
                healthy += 1
                keep.append(c)
            elif b.allows():
                keep.append(c)  # a half-open probe slot
        total = len(candidates)
        panic = total > 0 and healthy < self.ejection.panic_threshold * total
        self._set_panic(panic, now, healthy, total)
        return Routable(list(candidates) if panic else keep, panic, healthy, total)

    def _set_panic(self, panic: bool, now: float, healthy: int, total: int) -> None:
        if panic == self.panic:
            return
        self.panic = panic
        self.panics += panic
        kind = EventKind.PANIC_START if panic else EventKind.PANIC_END
        event = BreakerEvent(
            now,
            self.name,
            kind,
            reason=(
                f"{healthy} of {total} agents healthy, panic threshold "
                f"{self.ejection.panic_threshold}"
            ),
        )
        for listener in self._listeners:
            listener.on_breaker_event(event)

    # -- reporting ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """Counts and per-breaker state for ``fleet status`` and metrics."""
        agents = [b.snapshot() for b in self._agents.values()]
        by_state = {s.value: 0 for s in BreakerState}
        for s in agents:
            by_state[s.state.value] += 1
        return {
            "agents": len(agents),
            "agents_by_state": by_state,
            "ejected": sorted(self._ejected),
            "max_ejected": self.max_ejected,
            "denied_trips": sum(s.denied_trips for s in agents),
            "panic": self.panic,
            "panics": self.panics,
            "dependencies": {n: b.snapshot().state.value for n, b in self._deps.items()},
        }


class _EjectionTracker:
    """Keeps the registry's set of ejected agents in step with each agent breaker."""

    __slots__ = ("_agent_id", "_registry")

    def __init__(self, registry: BreakerRegistry, agent_id: str):
        self._registry = registry
        self._agent_id = agent_id

    def on_breaker_event(self, event: BreakerEvent) -> None:
        if event.kind is EventKind.TRANSITION:
            self._registry._on_agent_transition(self._agent_id, event)
