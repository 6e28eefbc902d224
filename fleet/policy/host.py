"""HostCore: the decisions of one host's agents, pure, for the runtime and the simulator.

A host runs ``agents_per_host`` logical agents of one pool with ``slots`` tasks each.
Everything it *decides* lives here, with time and randomness injected (``clock``,
``rng``): which agent takes a task, which agents are routable, what a finished task
teaches the breakers, the router and health, whether a failure is retried, which tasks
are past their limit or wedged, which agents restart, when the outcome buffer of a
ledger shard goes out. The live ``AgentHost`` (``fleet.runtime.host``) is the asyncio
shell around one ``HostCore``: it runs agent coroutines and turns the core's answers into
Ray calls. The simulator (``fleet.sim``) drives the same object, one per simulated pool, on
virtual time. Neither re-implements a rule.

Events in, answers out. Every event is a method call and its answer is the return
value, so the hot path allocates nothing the old host did not:

- ``place(hint)`` -> an agent index with a free slot taken, or None; ``wait(token,
  hint)`` queues a task for the next free slot and ``withdraw(token)`` takes it back;
- ``arrive(key, now)``, ``start(key, i, item_id)``: task ``key`` reached the host, runs
  on agent ``i`` (for the watchdog and hung-task health); ``finish(key, ok, latency_s,
  task_type)`` -> the waiting tasks that got a slot, as ``(token, agent)`` pairs
  ("handoffs"); ``done(i, ...)`` is the same without the watch (the simulator);
- ``decide_retry(...)`` -> ``Retry`` (hand back after a delay) or the final verdict;
- ``tick(now, last)`` -> ``TickActions``: tasks to cancel (past ``task_timeout_s``),
  tasks to abandon (wedged: they ignored the cancel for ``hung_task_grace_s``), agents to
  restart (and after which attempt), heartbeats to ask, handoffs;
- ``set_active(n)``, ``heartbeat(i)``, ``restart_done(i, ...)``, ``restart_failed(i,
  detail)``, ``park(i, after_s)``/``unpark(i)`` (budgets), ``apply_verdict(...)`` (the
  fleet cascade guard's answer); ``add_agent``/``hold``/``admit`` for a driver that
  keeps its agents' lives itself (the simulator). Health events that answer nothing
  leave their restarts and handoffs in ``pending`` (``take_pending``).

The stages, each a small class with its hooks, composed by ``HostCore``; the spec
configures each (agent breakers off: ``Breakers`` feeds nothing; one attempt: ``Retries``
never retries; no budgets: nothing is ever parked):

- ``Slots``: agents as ``CoreAgent`` (a ``Candidate`` the routers read in place, no
  snapshot per decision), the routable ones, the ones with room, waiting tasks, the
  router with task hints and outcome feedback, and the latency EWMA;
- ``Breakers``: per-agent circuit breakers (``fleet.policy.breaker``) with deferred
  feeding of fast successes, the ejection cap, panic mode and half-open probes;
- ``Retries``: ``fleet.policy.retry`` (retryable errors, attempts, backoff, deadline,
  retry budget), and the redelivery of tasks every agent here is too poor to run;
- ``Health``: ``fleet.policy.health`` over the host's agents (error rate, heartbeats,
  hung tasks, restarts with backoff within the fleet cascade guard's permits); off in
  the simulator, whose agents die rather than hang;
- ``Parking``: agents refused by their own budget keep a slot taken for a while;
- ``Watch``: task time limits and wedged agents (the per-task recording rules);
- ``RecordBuffers``: outcomes coalesced per ledger shard.

Why hand-written and not a framework: this is the per-task hot path of both the live
host (thousands of tasks a second on two cores) and the simulator (a million tasks in
seconds); each event is a few attribute reads and writes.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fleet.policy.breaker import (
    BreakerEvent,
    BreakerEventLog,
    BreakerListener,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    EventKind,
)
from fleet.policy.health import (
    ActionKind,
    AgentState,
    FailureReason,
    FleetGate,
    GuardState,
    HealthAction,
    HealthEventLog,
    HealthMonitor,
)
from fleet.policy.retry import RetryPolicy, RetryVerdict
from fleet.policy.routing import (
    Candidate,
    CapacityRouter,
    FullScanRouter,
    LeastLoadedRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    RoutingHint,
    SpecializationRouter,
    make_router,
)
from fleet.spec.health import HealthSpec
from fleet.spec.resilience import ResilienceSpec, WindowKind

Clock = Callable[[], float]

LATENCY_EWMA_ALPHA = 0.2
MAX_WAITERS_SCANNED = 32  # per wake-up, when the router refuses the oldest waiting task
RECHECK_S = 0.5  # an open breaker's end passed during a refresh: look again this later
HEALTH_TICK_S = 0.5  # the longest a host waits between two ticks
HEALTH_EVENTS_KEPT = 1_000
# The controller answers every metrics interval (1 s); a verdict older than this means
# it is unreachable, and the host's own guard decides alone (see FleetGate).
GATE_STALE_S = 5.0
BUDGET_PARK_MAX_S = 60.0
RECORD_COALESCE_S = 0.005
RECORD_MAX_OUTCOMES = 512

# Routers that pick by load alone and learn nothing from outcomes.
BALANCERS = (LeastLoadedRouter, FullScanRouter, RoundRobinRouter, RandomRouter, CapacityRouter)
# Those whose choice among the agents with room is their choice among all (a full agent
# is never picked, and the order does not matter): they are shown only the agents with
# room. Round robin keeps its turn over the stable order of all routable agents.
AMONG_FREE = (LeastLoadedRouter, FullScanRouter, RandomRouter, CapacityRouter)
_NO_HANDOFFS: tuple[tuple[Any, int], ...] = ()
ORPHAN = -1  # the agent of a task whose agent was restarted under it


class CoreAgent(Candidate):
    """A logical agent as the core keeps it; as a ``Candidate`` the routers read it in
    place. ``ridx``/``fidx``: its index in ``Slots.routable``/``Slots.free`` (-1: not
    there)."""

    __slots__ = ("breaker", "clean", "fidx", "held", "index", "owed", "ridx", "streak")

    def __init__(self, agent_id: str, index: int, capacity: int):
        self.id = agent_id
        self.in_flight = 0
        self.capacity = capacity
        self.latency_s = 0.0
        self.weight = 1.0
        self.expertise: frozenset[str] = frozenset()
        self.success_rate = None
        self.calls = 0
        self.index = index
        self.fidx = -1
        self.ridx = -1
        self.held = False  # the driver holds it out of routing (see HostCore.hold)
        self.breaker: CircuitBreaker | None = None
        self.clean = False
        self.owed = 0
        self.streak = 0

    def __repr__(self) -> str:
        return f"CoreAgent({self.id!r}, in_flight={self.in_flight})"


# --- stages ----------------------------------------------------------------------------


class Slots:
    """Agents, their slots and the router.

    ``routable``: the agents breakers, health and the driver let through; ``free``:
    those of them with a free slot. Both are kept in O(1) per change (swap removal; an
    agent's ``ridx``/``fidx`` is its place, -1 when absent), so a driver with ten
    thousand agents pays nothing per task for them. Load-only routers that never pick a
    full agent choose among ``free`` (``AMONG_FREE``: power-of-d then costs O(d) however
    full the host is); round robin and the task-aware routers among ``routable``, since
    their choice depends on who is there, not only on who has room (round robin's turn,
    affinity's ranking of the stable set). Invariants: an agent is in ``free`` iff it is in
    ``routable`` with ``in_flight < capacity``; ``free_slots`` is the sum of the free
    slots of routable agents.
    """

    def __init__(self, agents: list[CoreAgent], router: Router, rng: random.Random):
        self.agents = agents
        self.router = router
        self.rng = rng
        self.among_free = isinstance(router, AMONG_FREE)
        self.learns = not isinstance(router, BALANCERS)
        self.active = 0
        self.routable: list[CoreAgent] = []
        self.free: list[CoreAgent] = []
        self.free_slots = 0
        self.waiters: deque[tuple[Any, RoutingHint | None]] = deque()

    @staticmethod
    def is_routable(a: CoreAgent) -> bool:
        return a.ridx >= 0

    def set_routable(self, agents: Iterable[CoreAgent]) -> None:
        """The routable agents are exactly ``agents`` (a full recompute)."""
        for a in self.routable:
            a.ridx = -1
        for a in self.free:
            a.fidx = -1
        self.routable, self.free, self.free_slots = [], [], 0
        for a in agents:
            self.route(a)

    def route(self, a: CoreAgent) -> None:
        """``a`` becomes routable (no-op if it is)."""
        if a.ridx >= 0:
            return
        a.ridx = len(self.routable)
        self.routable.append(a)
        room = a.capacity - a.in_flight
        if room > 0:
            self.free_slots += room
            a.fidx = len(self.free)
            self.free.append(a)

    def unroute(self, a: CoreAgent) -> None:
        """``a`` leaves routing (no-op if it is out): it keeps what it runs."""
        if a.ridx < 0:
            return
        _unroute(self.routable, a)
        if a.fidx >= 0:
            _unfree(self.free, a)
        self.free_slots -= max(0, a.capacity - a.in_flight)

    def choose(self, hint: RoutingHint | None) -> CoreAgent | None:
        free = self.free
        if not free:
            return None
        if self.among_free:
            j = self.router.choose(free, self.rng, hint)
            return None if j is None else free[j]
        j = self.router.choose(self.routable, self.rng, hint)
        return None if j is None else self.routable[j]

    def take(self, a: CoreAgent) -> None:
        a.in_flight += 1
        if a.ridx >= 0:
            self.free_slots -= 1
            if a.in_flight >= a.capacity and a.fidx >= 0:
                _unfree(self.free, a)

    def give_back(self, a: CoreAgent) -> bool:
        """Free one of ``a``'s slots; True when the slot may be handed out."""
        a.in_flight -= 1
        if a.ridx < 0:
            return False
        self.free_slots += 1
        if a.fidx < 0 and a.in_flight < a.capacity:
            a.fidx = len(self.free)
            self.free.append(a)
        return True

    def observe(self, a: CoreAgent, ok: bool, latency_s: float, kind: str | None) -> None:
        a.latency_s += LATENCY_EWMA_ALPHA * (latency_s - a.latency_s)
        if self.learns:
            self.router.record_outcome(a.id, ok, kind)

    def forget(self, a: CoreAgent) -> None:
        """What the router and the EWMA know of ``a`` does not carry over (restart,
        half-open breaker)."""
        a.latency_s = 0.0
        self.router.forget(a.id)


# Swap removal, once per index slot (``fidx``, ``ridx``; the simulator's state lists have
# a third, ``lidx``): these run per task, where reaching the slot by name (getattr and
# setattr) would cost more than the six lines it saves.
def _unfree(free: list[CoreAgent], a: CoreAgent) -> None:
    i = a.fidx
    last = free.pop()
    if last is not a:
        free[i] = last
        last.fidx = i
    a.fidx = -1


def _unroute(routable: list[CoreAgent], a: CoreAgent) -> None:
    i = a.ridx
    last = routable.pop()
    if last is not a:
        routable[i] = last
        last.ridx = i
    a.ridx = -1


class Breakers:
    """Per-agent breakers, fed lazily.

    Deferred feeds, exact for count windows (the default). Invariant: when ``a.clean``,
    agent a's breaker is CLOSED and its window holds only fast successes, so one more
    fast success can neither trip it nor change what a later outcome does, except for
    the window's length: the core owes it (``a.owed``, at most ``window_calls``) and
    feeds the owed successes just before the next failure or slow call, or before its
    state is read for stats. A window becomes clean when the breaker closes (it is
    cleared) or after ``window_calls`` fast successes in a row (``a.streak``) while
    closed. On a healthy pool this makes the breakers nearly free. Time windows age
    their calls, so they get every outcome at once.
    """

    def __init__(
        self,
        spec: ResilienceSpec,
        clock: Clock,
        listeners: list[BreakerListener],
        name: str,
    ):
        self.log = BreakerEventLog()
        self.registry = BreakerRegistry(spec, clock, [self.log, *listeners], name=name)
        ab = spec.agent_breaker
        self.enabled = ab.enabled
        self.defer = ab.enabled and ab.window is WindowKind.COUNT
        self.window_calls = ab.window_calls
        self.slow_call_s = ab.slow_call_duration_s

    def sync(self, agents: list[CoreAgent], active: int) -> None:
        reg = self.registry
        reg.sync_agents([a.id for a in agents[:active]])
        for a in agents:
            b = reg.agent(a.id) if a.index < active else None
            if b is not a.breaker:  # a new (closed, empty) breaker, or none
                a.clean = self.defer
                a.owed = a.streak = 0
            a.breaker = b

    def observe(self, a: CoreAgent, ok: bool, latency_s: float) -> None:
        b = a.breaker
        if b is None:  # draining: no longer in the registry
            return
        if ok and latency_s < self.slow_call_s:
            if a.clean:
                if a.owed < self.window_calls:
                    a.owed += 1
            else:
                b.record(True, latency_s)
                a.streak += 1
                if (
                    self.defer
                    and a.streak >= self.window_calls
                    and b.state is BreakerState.CLOSED
                ):
                    a.clean = True
        else:
            self.pay(a)
            a.clean = False
            a.streak = 0
            b.record(ok, latency_s)

    def pay(self, a: CoreAgent) -> None:
        """Feed ``a``'s breaker the fast successes owed to it (see the class doc)."""
        owed, a.owed = a.owed, 0
        b = a.breaker
        if b is not None:
            for _ in range(owed):
                b.record(True, None)

    def transition(self, a: CoreAgent, new: BreakerState) -> None:
        # OPEN and CLOSED clear the window; HALF_OPEN counts probes: feed everything.
        a.streak = a.owed = 0
        a.clean = self.defer and new is BreakerState.CLOSED

    @property
    def quiet(self) -> bool:
        reg = self.registry
        return not reg.ejected and not reg.panic


class Retries:
    """Whether a failed task runs again, and after how long (``fleet.policy.retry``)."""

    def __init__(self, spec: ResilienceSpec, clock: Clock, rng: random.Random):
        self.policy = RetryPolicy(spec.retry, clock, rng)
        self.max_deliveries = spec.max_deliveries
        self.retries = 0
        self.final: Counter[str] = Counter()  # verdicts of unretried failures

    def decide(
        self, deliveries: int, reason: str | None, error: str | None, time_left_s: float | None
    ) -> Retry:
        attempt = max(1, deliveries)
        d = self.policy.decide(
            attempt,
            reason,
            error,
            task_max_attempts=self.max_deliveries,
            time_left_s=time_left_s,
        )
        if d.retry:
            self.retries += 1
            return Retry(d.delay_s, reason, error)
        self.final[d.verdict.value] += 1
        if d.verdict is RetryVerdict.NOT_RETRYABLE or self.policy.spec.max_attempts == 1:
            # (Retries off: the failure keeps its own reason, not "max_attempts".)
            return Retry(None, reason, error)
        return Retry(
            None,
            d.verdict.value,
            f"{d.verdict.value} after attempt {attempt}: {reason}: {error}",
        )

    def requeue(self, deliveries: int, delay_s: float) -> float | None:
        """Every agent here is out of its own budget: redeliver after ``delay_s``, or
        None on the task's last delivery (it fails with ``budget_exhausted``)."""
        if deliveries + 1 >= self.max_deliveries:
            return None
        self.retries += 1
        return delay_s


class Retry(NamedTuple):
    """A failure's fate: ``delay_s`` None means final, with ``reason``/``error`` to
    record (the retry verdict replaces the reason when retries ran out)."""

    delay_s: float | None
    reason: str | None
    error: str | None


class Health:
    """``HealthMonitor`` over the host's agents, behind a ``FleetGate``.

    Per task (O(1)): successes are tallied per agent and handed over in bulk each tick
    (they only dilute the error rate, so handing them over late never hides a failure);
    a failure goes to the monitor at once, and if it trips the error rate the agent
    leaves the routable set before it can take another task.
    """

    def __init__(self, spec: HealthSpec, n: int, clock: Clock, rng: random.Random, name: str):
        self.spec = spec
        self.events = HealthEventLog(size=HEALTH_EVENTS_KEPT)
        self.gate = FleetGate(spec.cascade, GATE_STALE_S, name=name)
        self.monitor = HealthMonitor(
            spec, clock, rng, [self.events], name=name, guard=self.gate
        )
        self.ok = [0] * n  # successes not yet handed to the monitor
        self.out: set[int] = set()  # agents health holds out of service
        self.members: set[int] = set()
        self.restarts = 0
        # At least twice per heartbeat interval, so a beat is never a whole tick late.
        self.tick_s = min(HEALTH_TICK_S, spec.heartbeat_interval_s / 2)
        self.next_beat_s = 0.0
        self.last_tick_s: float | None = None
        self.all_out_since: float | None = None

    def in_service(self, i: int) -> bool:
        return i in self.members and i not in self.out


@dataclass(slots=True)
class TickActions:
    """What a tick asks of the shell. ``cancel``/``abandon``: task keys; ``restart``:
    (agent index, attempt); ``beat``: agents whose own heartbeat to ask (the core
    beats for the others); ``handoffs``: waiting tasks that got a slot."""

    cancel: list[Hashable] = field(default_factory=list)
    abandon: list[tuple[Hashable, float]] = field(default_factory=list)
    restart: list[tuple[int, int]] = field(default_factory=list)
    beat: list[int] = field(default_factory=list)
    handoffs: list[tuple[Any, int]] = field(default_factory=list)


class Watch:
    """Time limits of the tasks in the host (the per-task recording rules).

    A task past ``task_timeout_s`` (counted from when it reached the host, so waiting
    for a slot counts) is cancelled, again each tick: a wedged agent may catch one
    cancel and not the next. One still running ``hung_task_grace_s`` after its first
    cancel has an agent that swallows cancellation: it is *abandoned*: it fails with
    ``timeout`` now, recorded and not retried (it would wedge another agent), without
    holding its batch-mates; health's hung rule restarts its agent. After a stall of
    the caller's loop longer than the grace nothing is abandoned on that pass: the
    cancel has not been delivered yet.
    """

    def __init__(self, limit_s: float, grace_s: float):
        self.limit_s = limit_s
        self.grace_s = grace_s
        self.since: dict[Hashable, float] = {}  # key -> reached the host
        self.on: dict[Hashable, tuple[int, str]] = {}  # key -> (agent, item id)
        self.cancelled_at: dict[Hashable, float] = {}
        self.abandoned: set[Hashable] = set()
        self.n_abandoned = 0


class Parking:
    """Agents refused by their own budget keep one slot taken for a while."""

    def __init__(self) -> None:
        self.by_agent: Counter[int] = Counter()  # agent -> its parked slots (no zeros)
        self.retry_after_s = BUDGET_PARK_MAX_S

    @property
    def slots(self) -> int:
        """Parked slots in all."""
        return sum(self.by_agent.values())


class RecordBuffers:
    """Outcomes waiting for their ledger shard: a shard's buffer goes out
    ``coalesce_s`` after its first entry, or at once when it holds ``max_outcomes``:
    a few milliseconds of latency buy one ledger transaction for every task the host
    finishes meanwhile, across its batches. The entries are the shell's; the core
    decides when."""

    FLUSH, ARM, NONE = 0, 1, 2

    def __init__(
        self,
        shards: int,
        coalesce_s: float = RECORD_COALESCE_S,
        max_outcomes: int = RECORD_MAX_OUTCOMES,
    ):
        self.coalesce_s = coalesce_s
        self.max_outcomes = max_outcomes
        self.entries: list[list[Any]] = [[] for _ in range(shards)]
        self.counts = [0] * shards  # outcomes (not excusals) per shard
        self.armed = [False] * shards

    def add(self, shard: int, entry: Any, outcome: bool = True) -> int:
        """Queue an entry; FLUSH: send the shard's buffer now; ARM: send it in
        ``coalesce_s``; NONE: a send is already due."""
        self.entries[shard].append(entry)
        if outcome:
            self.counts[shard] += 1
            if self.counts[shard] >= self.max_outcomes:
                return self.FLUSH
        if not self.armed[shard]:
            self.armed[shard] = True
            return self.ARM
        return self.NONE

    def take(self, shard: int) -> list[Any]:
        got, self.entries[shard] = self.entries[shard], []
        self.counts[shard] = 0
        self.armed[shard] = False
        return got


# --- the core ----------------------------------------------------------------------------


class HostCore:
    """The decisions of one host (see the module docstring).

    ``slots`` is tasks per agent (``concurrency_per_agent``; the simulator adds its
    agents' local queues). ``agent_factory`` builds the agents (the simulator's carry
    more state).
    """

    def __init__(
        self,
        host_id: str,
        n_agents: int,
        slots: int,
        routing: Any,
        resilience: ResilienceSpec,
        health: HealthSpec | None,
        *,
        clock: Clock,
        rng: random.Random,
        agent_factory: Callable[[str, int, int], CoreAgent] = CoreAgent,
        listeners: Iterable[BreakerListener] = (),
    ):
        self.host_id = host_id
        self.clock = clock
        self.rng = rng
        self.c = slots
        self.agents = [agent_factory(f"{host_id}/{i}", i, slots) for i in range(n_agents)]
        self.resilience = resilience
        router = make_router(routing, clock=clock)
        self.slots = Slots(self.agents, router, random.Random(rng.random()))
        self.hinted = self.slots.learns  # task-aware routers need a RoutingHint per task
        self.eager_setup = isinstance(router, SpecializationRouter)
        # Always built: the registry also holds the agents' dependency breakers. With
        # agent breakers off it feeds nothing and never takes an agent out.
        self.breakers = Breakers(resilience, clock, [self, *listeners], host_id)
        self.retries = Retries(resilience, clock, random.Random(rng.random()))
        # health None: the stage is off (the simulator: its agents die rather than
        # hang or miss beats, and its restarts follow the fleet guard directly).
        self.health_on = health is not None
        hspec = health if health is not None else HealthSpec()
        self.health = Health(hspec, n_agents, clock, random.Random(rng.random()), host_id)
        self.watch = Watch(resilience.task_timeout_s, hspec.hung_task_grace_s)
        self.parking = Parking()
        self._dirty = True  # a breaker changed state: recompute the routable agents
        self._recheck_at = math.inf  # when the next open breaker turns half-open
        self._probing: set[int] = set()  # routable agents whose breaker is half-open
        self.custom_beat: set[int] = set()  # agents with a heartbeat of their own
        # Actions of events that answer something else (a failure that trips health,
        # a heartbeat that readmits an agent): the shell collects them (take_pending).
        self.pending: TickActions | None = None
        self.trace: list[tuple[Any, ...]] | None = None  # set to a list to record answers

    # -- membership ---------------------------------------------------------------------
    def set_active(self, n: int) -> list[tuple[Any, int]]:
        """Run ``n`` agents (1..n_agents); the ones above drain: they finish what they
        run and take nothing new. Returns the handoffs to waiting tasks."""
        n = max(1, min(n, len(self.agents)))
        s = self.slots
        if n == s.active:
            return []
        s.active = n
        self.breakers.sync(self.agents, n)
        if self.health_on:
            self._health_sync()
        self.refresh()
        return self.wake()

    def _health_sync(self) -> None:
        """New active agents join health (in service), drained ones leave it."""
        h = self.health
        mon, active = h.monitor, self.slots.active
        for a in self.agents:
            i = a.index
            if i < active and i not in h.members:
                h.members.add(i)
                h.ok[i] = 0
                mon.add_agent(a.id, self.host_id.split("/", 1)[0])
                mon.heartbeat(a.id)  # a slot that is about to be used: in service
            elif i >= active and i in h.members:
                h.members.discard(i)
                mon.remove_agent(a.id)
                h.out.discard(i)
        mon.take_actions()  # the ADMITs of new agents: they are routable already

    # -- routing ------------------------------------------------------------------------
    def on_breaker_event(self, event: BreakerEvent) -> None:
        """Registry listener: any state change may change which agents are routable.

        An agent whose breaker turns half-open starts from a clean slate: its latency
        estimate and the router's success stats date from before it was ejected, and
        would keep the router away from it, starving the probe calls that decide its
        re-admission (and, once closed, the agent itself).
        """
        self._dirty = True
        if event.kind is not EventKind.TRANSITION or not event.name.startswith("agent:"):
            return  # (a dependency breaker, or the registry's panic)
        tail = event.name.rsplit("/", 1)[-1]
        if not (tail.isdigit() and int(tail) < len(self.agents)):
            return
        a = self.agents[int(tail)]
        assert event.new is not None
        self.breakers.transition(a, event.new)
        if event.new is BreakerState.HALF_OPEN:
            self.slots.forget(a)

    def refresh(self) -> None:
        """Recompute the routable agents. O(active agents); runs only after a breaker
        or health changed an agent's state, when the active count changes, and when an
        open breaker's open duration has passed."""
        s = self.slots
        self._probing = set()
        self._recheck_at = math.inf
        out = self.health.out
        brk = self.breakers
        # Agents health took out of service (or the driver holds) are not offered to
        # the breakers at all: panic mode may route to ejected agents, never to failed
        # ones.
        cands = [a for a in self.agents[: s.active] if not a.held and a.index not in out]
        if brk.quiet:
            s.set_routable(cands)
        else:
            reg = brk.registry
            r = reg.routable(cands)
            s.set_routable(r.candidates)
            now = self.clock()
            for agent_id in reg.ejected:
                b = reg.agent(agent_id)
                idx = int(agent_id.rsplit("/", 1)[1])
                if not r.panic and b.state is not BreakerState.CLOSED:
                    if self.agents[idx].ridx >= 0:
                        self._probing.add(idx)
                until = b.open_until_s
                if until is not None:
                    self._recheck_at = min(self._recheck_at, until)
            if self._recheck_at <= now:
                self._recheck_at = now + RECHECK_S
        # Transitions caused by reading the breakers above are already accounted for.
        self._dirty = False

    @property
    def next_recheck_s(self) -> float:
        """When an open breaker turns half-open (inf: none is open): a driver with no
        periodic tick looks again then."""
        return self._recheck_at

    # -- a driver's own agents (the simulator) ----------------------------------------------
    def add_agent(self, a: CoreAgent) -> int:
        """Append agent ``a`` (held out until ``admit``); returns its index."""
        a.index = len(self.agents)
        a.held = True
        self.agents.append(a)
        self.slots.active = len(self.agents)
        return a.index

    def hold(self, i: int, gone: bool = False) -> None:
        """The driver takes agent ``i`` out of routing (starting, draining, dead); it
        keeps what it runs. ``gone``: its breaker leaves the registry (and the cap)."""
        a = self.agents[i]
        a.held = True
        self.slots.unroute(a)
        self._probing.discard(i)
        if gone and a.breaker is not None:
            self.breakers.registry.remove_agent(a.id)
            a.breaker = None
            self._dirty = self._dirty or not self.breakers.quiet

    def admit(self, i: int) -> None:
        """The driver puts agent ``i`` (back) in service, with a fresh closed breaker if
        it had none."""
        a = self.agents[i]
        a.held = False
        brk = self.breakers
        if a.breaker is None:
            a.breaker = brk.registry.agent(a.id)
            brk.transition(a, BreakerState.CLOSED)
        if brk.quiet and i not in self.health.out:
            self.slots.route(a)
        else:
            self._dirty = True

    def place(self, hint: RoutingHint | None) -> int | None:
        """Take a free slot on the agent the router picks for the task, or None: no
        agent may take it now."""
        if self._dirty or (self._recheck_at != math.inf and self.clock() >= self._recheck_at):
            self.refresh()
        s = self.slots
        while s.free:
            a = s.choose(hint)
            if a is None:
                return None
            if self._probing and a.index in self._probing:
                if not self.breakers.registry.acquire(a.id):
                    self.refresh()  # its probe permits are taken: it leaves routing
                    continue
            s.take(a)
            if self.trace is not None:
                self.trace.append(("place", a.index))
            return a.index
        return None

    def wait(self, token: Any, hint: RoutingHint | None) -> None:
        """Queue a task that found no slot; ``finish``/``tick`` hand it one."""
        self.slots.waiters.append((token, hint))

    def withdraw(self, token: Any) -> bool:
        """A waiting task gave up (timed out): it no longer waits."""
        w = self.slots.waiters
        for k, (t, _) in enumerate(w):
            if t is token:
                del w[k]
                return True
        return False

    def wake(self) -> list[tuple[Any, int]]:
        """Hand free slots to waiting tasks, oldest first (a task the router will not
        place now, e.g. one waiting for an expert, is passed over)."""
        waiters = self.slots.waiters
        if not waiters:
            return []
        out: list[tuple[Any, int]] = []
        k = 0
        while waiters and self.slots.free and k < min(len(waiters), MAX_WAITERS_SCANNED):
            token, hint = waiters[k]
            i = self.place(hint)
            if i is None:
                k += 1
                continue
            del waiters[k]
            out.append((token, i))
        return out

    # -- tasks --------------------------------------------------------------------------
    def arrive(self, key: Hashable, now: float) -> None:
        """Task ``key`` reached the host: its time limit runs from now."""
        self.watch.since[key] = now

    def start(self, key: Hashable, i: int, item_id: str) -> None:
        """Task ``key`` runs on agent ``i``."""
        self.watch.on[key] = (i, item_id)

    def finish(
        self, key: Hashable, ok: bool | None, latency_s: float, kind: str | None
    ) -> tuple[tuple[Any, int], ...] | list[tuple[Any, int]]:
        """Task ``key`` ended (``ok``: succeeded; a timeout is a failure; None: it was
        stopped from outside, preempted, and says nothing of its agent). Feeds the
        agent's latency EWMA, breaker, health and the router, frees its slot and returns
        the handoffs. A task whose agent was restarted under it changes nothing: its
        slot was given back then."""
        on = self._forget(key)
        if on is None or on[0] == ORPHAN:
            return _NO_HANDOFFS
        if ok is None:
            return self.release(on[0])
        return self.done(on[0], ok, latency_s, kind)

    def done(
        self, i: int, ok: bool, latency_s: float, kind: str | None
    ) -> tuple[tuple[Any, int], ...] | list[tuple[Any, int]]:
        """A task on agent ``i`` ended (``finish`` without the watch: a driver that
        keeps time limits itself)."""
        a = self.agents[i]
        self.slots.observe(a, ok, latency_s, kind)
        h = self.health
        if not self.health_on:
            pass
        elif ok:
            h.ok[i] += 1
        elif i in h.members:
            n_ok, h.ok[i] = h.ok[i], 0
            if h.monitor.task_outcomes(a.id, n_ok, 1):
                self._apply_health(h.monitor.take_actions())
        if self.breakers.enabled:
            self.breakers.observe(a, ok, latency_s)
        if self.trace is not None:
            self.trace.append(("finish", i, ok))
        return self.release(i)

    def leave(self, key: Hashable) -> None:
        """Task ``key`` left without an agent (refused, or timed out waiting)."""
        self._forget(key)

    def _forget(self, key: Hashable) -> tuple[int, str] | None:
        """Drop task ``key`` from the watch; return its (agent, item id), if it had one.
        (Only cancelled tasks can be abandoned: most ends skip both lookups.)"""
        w = self.watch
        w.since.pop(key, None)
        if w.cancelled_at:
            w.cancelled_at.pop(key, None)
            w.abandoned.discard(key)
        return w.on.pop(key, None)

    def release(self, i: int) -> tuple[tuple[Any, int], ...] | list[tuple[Any, int]]:
        """Free one slot of agent ``i`` (no outcome to learn from) and hand it on."""
        if self.slots.give_back(self.agents[i]) and self.slots.waiters:
            return self.wake()
        return _NO_HANDOFFS

    def decide_retry(
        self,
        deliveries: int,
        reason: str | None,
        error: str | None,
        time_left_s: float | None = None,
    ) -> Retry:
        """A failed task: retry after ``delay_s``, or final (see ``Retry``)."""
        r = self.retries.decide(deliveries, reason, error, time_left_s)
        if self.trace is not None:
            self.trace.append(("retry", r.delay_s, r.reason))
        return r

    def first_attempts(self, n: int) -> None:
        """``n`` first deliveries reached the host (the retry budget's base)."""
        if n:
            self.retries.policy.record_request(n)

    # -- time ---------------------------------------------------------------------------
    def tick(self, now: float, last: float | None) -> TickActions:
        """The periodic pass, every ``tick_s`` (``last``: when the previous one ran).

        Cancels tasks past their limit, abandons wedged ones, hands over tallied
        successes, beats for agents without a heartbeat of their own, reports hung
        agents, applies the monitor's actions and lets waiting tasks see open breakers
        that turned half-open with time alone.
        """
        # One object collects the tick's answers and those health events leave while it
        # runs (restarts, handoffs: see _apply_health), as well as any left before it.
        act = self._pend()
        self._watch(now, last, act)
        self._health_tick(now, act)
        if self._dirty or self.breakers.registry.ejected:
            self.refresh()
            act.handoffs.extend(self.wake())
        self.pending = None
        return act

    @property
    def tick_s(self) -> float:
        return self.health.tick_s

    def _watch(self, now: float, last: float | None, act: TickActions) -> None:
        w = self.watch
        gap = self.tick_s
        stalled = last is not None and now - last > gap + max(w.grace_s, gap)
        for key, t0 in w.since.items():
            if now - t0 <= w.limit_s:
                continue
            act.cancel.append(key)
            first = w.cancelled_at.setdefault(key, now)
            if not stalled and now - first >= w.grace_s and key not in w.abandoned:
                w.abandoned.add(key)
                w.n_abandoned += 1
                act.abandon.append((key, now - t0))

    def _health_tick(self, now: float, act: TickActions) -> None:
        h = self.health
        mon, agents = h.monitor, self.agents
        for i in range(self.slots.active):
            if h.ok[i]:
                ok, h.ok[i] = h.ok[i], 0
                mon.task_outcomes(agents[i].id, ok, 0)
        # A tick late by more than a heartbeat interval means the host stalled as a
        # whole: every agent looks silent. Ask them now and judge next tick, so that
        # the host's own stall is not blamed on its agents.
        stalled = (
            h.last_tick_s is not None
            and now - h.last_tick_s > h.tick_s + h.spec.heartbeat_interval_s
        )
        h.last_tick_s = now
        if now >= h.next_beat_s or stalled:
            h.next_beat_s = now + h.spec.heartbeat_interval_s
            act.beat.extend(self._beat())
        if stalled:
            return
        self._find_hung(now)
        self._apply_health(mon.tick())  # its restarts and handoffs land in act (pending)
        if not self.slots.active or any(h.in_service(i) for i in range(self.slots.active)):
            h.all_out_since = None
        elif h.all_out_since is None:
            h.all_out_since = now

    def _beat(self) -> list[int]:
        """Beat for the agents that live as long as the host's loop does; return the
        others (their own ``heartbeat`` is asked by the shell)."""
        h = self.health
        mon = h.monitor
        ask: list[int] = []
        for i in range(self.slots.active):
            if i not in h.members:
                continue
            state = mon.state(self.agents[i].id)
            if state in (AgentState.RESTARTING, AgentState.EJECTED):
                continue  # a restart reports by itself; an ejected agent is out for good
            if i in self.custom_beat:
                ask.append(i)
            else:
                mon.heartbeat(self.agents[i].id)
        return ask

    def _find_hung(self, now: float) -> None:
        """Tasks past ``task_timeout_s`` + grace that still run ignored the cancel:
        their agent is hung. O(tasks in flight)."""
        w, h = self.watch, self.health
        cutoff = w.limit_s + h.spec.hung_task_grace_s
        mon = h.monitor
        for key, t0 in w.since.items():
            if now - t0 <= cutoff:
                continue
            i, item_id = w.on.get(key, (ORPHAN, ""))
            if i == ORPHAN or i not in h.members:
                continue
            failure = mon.detector.hung(item_id, t0, w.limit_s, now)
            agent_id = self.agents[i].id
            if failure is not None and mon.in_service(agent_id):
                mon.report_failure(agent_id, failure.detail, FailureReason.HUNG_TASK)

    def _pend(self) -> TickActions:
        if self.pending is None:
            self.pending = TickActions()
        return self.pending

    def take_pending(self) -> TickActions | None:
        """The restarts and handoffs that health events left for the shell."""
        got, self.pending = self.pending, None
        return got

    def _apply_health(self, actions: list[HealthAction]) -> None:
        """Apply the monitor's actions; restarts and handoffs go to ``pending``."""
        h = self.health
        changed = False
        restarts: list[tuple[int, int]] = []
        for a in actions:
            i = int(a.agent_id.rsplit("/", 1)[1])
            if a.kind in (ActionKind.REMOVE, ActionKind.EJECT):
                if i not in h.out:
                    h.out.add(i)
                    changed = True
            elif a.kind is ActionKind.ADMIT:
                if i in h.out:
                    h.out.discard(i)
                    changed = True
            elif a.kind is ActionKind.RESTART:
                h.restarts += 1
                self._orphan(i)
                self.slots.forget(self.agents[i])
                restarts.append((i, a.attempt))
        if changed:
            self.refresh()
            handoffs = self.wake()
            if handoffs:
                self._pend().handoffs.extend(handoffs)
        if restarts:
            self._pend().restart.extend(restarts)
            if self.trace is not None:
                self.trace.append(("restart", *restarts))

    def _orphan(self, i: int) -> None:
        """Free the slots of agent i's tasks that outlived their limit (hung on the old
        instance): the restarted agent starts with all its slots."""
        w = self.watch
        now = self.clock()
        for key, (j, item_id) in list(w.on.items()):
            if j == i and now - w.since.get(key, now) > w.limit_s:
                w.on[key] = (ORPHAN, item_id)
                self.slots.give_back(self.agents[i])

    # -- health events from the shell ----------------------------------------------------
    def heartbeat(self, i: int) -> None:
        """Agent ``i`` answered its heartbeat (actions go to ``pending``)."""
        if i in self.health.members:
            mon = self.health.monitor
            mon.heartbeat(self.agents[i].id)
            self._apply_health(mon.take_actions())

    def restart_done(self, i: int, expertise: Iterable[str], weight: float) -> bool:
        """Agent ``i``'s new instance is set up. False: drained (or failed again)
        meanwhile, so the shell must drop it."""
        h = self.health
        a = self.agents[i]
        if not self._restarting(i):
            return False
        a.expertise = frozenset(expertise)
        a.weight = weight
        h.monitor.heartbeat(a.id)
        self._apply_health(h.monitor.take_actions())
        return True

    def restart_failed(self, i: int, detail: str) -> None:
        """Agent ``i``'s new instance failed to set up: the monitor hears it."""
        if not self._restarting(i):
            return  # a stale restart: the agent was drained (and maybe is back) since
        mon = self.health.monitor
        mon.report_failure(self.agents[i].id, detail, FailureReason.CRASHED)
        self._apply_health(mon.take_actions())

    def _restarting(self, i: int) -> bool:
        """Agent ``i`` is a member whose restart the monitor still waits for."""
        h = self.health
        return i in h.members and h.monitor.state(self.agents[i].id) is AgentState.RESTARTING

    def apply_verdict(self, state: str, permits: int) -> None:
        """The fleet guard's answer: its state and our restart permits (used now,
        before they go stale)."""
        h = self.health
        h.gate.apply(state, permits, self.clock())
        if permits:
            self._apply_health(h.monitor.tick())

    def health_problem(self, now: float) -> str | None:
        """Why this host should be replaced: no agent in service for longer than
        ``startup_timeout_s`` while the fleet guard lets restarts happen."""
        h = self.health
        since = h.all_out_since
        if since is None or any(h.in_service(i) for i in range(self.slots.active)):
            return None  # (the tick that noticed a recovery may not have run yet)
        limit = h.spec.startup_timeout_s
        if now - since > limit and h.gate.state is GuardState.CLOSED:
            return (
                f"no agent in service for more than startup_timeout_s={limit:g}s "
                "and in-host restarts did not bring one back"
            )
        return None

    # -- budgets ------------------------------------------------------------------------
    def all_parked(self) -> bool:
        """Every slot of every routable agent is parked (a parked slot of an agent that
        left routing does not count). O(routable agents), and only while any is parked."""
        p = self.parking
        if not p.by_agent:
            return False
        routable = self.slots.routable
        return sum(p.by_agent[a.index] for a in routable) >= len(routable) * self.c

    def park(self, i: int, after_s: float) -> tuple[float, list[Any]]:
        """Agent ``i``'s own budget is short: keep its slot taken for the returned delay,
        then ``unpark`` it. When that parks every slot here, the tasks waiting for a
        slot would wait for the first unpark: their tokens are returned (and no longer
        wait), for the shell to send them back to the queue."""
        p = self.parking
        p.by_agent[i] += 1
        p.retry_after_s = min(after_s, BUDGET_PARK_MAX_S)
        evicted: list[Any] = []
        if self.all_parked():
            evicted = [t for t, _ in self.slots.waiters]
            self.slots.waiters.clear()
        return p.retry_after_s, evicted

    def unpark(self, i: int) -> tuple[tuple[Any, int], ...] | list[tuple[Any, int]]:
        p = self.parking
        p.by_agent[i] -= 1
        if not p.by_agent[i]:
            del p.by_agent[i]
        return self.release(i)

    def requeue_delay(self, deliveries: int, delay_s: float | None) -> float | None:
        """Every agent here is parked: the task goes back to the queue after this
        delay (None: its last delivery, it fails with ``budget_exhausted``)."""
        p = self.parking
        d = delay_s if delay_s is not None else p.retry_after_s
        return self.retries.requeue(deliveries, d)

    # -- state for stats ----------------------------------------------------------------
    def settle_breakers(self) -> None:
        """Pay every owed breaker feed, so the breakers' counts are complete."""
        if self.breakers.enabled:
            for a in self.agents[: self.slots.active]:
                if a.owed:
                    self.breakers.pay(a)

    @property
    def in_flight(self) -> int:
        return sum(a.in_flight for a in self.agents)

    @property
    def active(self) -> int:
        return self.slots.active

    def agent_failing(self, i: int) -> bool:
        return i in self.health.out


__all__ = [
    "BUDGET_PARK_MAX_S",
    "RECORD_COALESCE_S",
    "RECORD_MAX_OUTCOMES",
    "CoreAgent",
    "HostCore",
    "RecordBuffers",
    "Retry",
    "TickActions",
]
