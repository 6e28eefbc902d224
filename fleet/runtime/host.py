"""AgentHost: one Ray Serve replica running many logical agents of one pool.

A batch of items arrives in one call; each item is routed on its own to a logical agent
with a free slot (an agent has ``concurrency_per_agent`` slots) by the pool's router
(``fleet.policy.routing``), which sees the host's agents as ``Candidate`` snapshots:
tasks in flight, slots, a latency EWMA, and, for the success-rate router, the outcomes
it was fed. When no agent the router accepts has a free slot, the task waits in the host
(the dispatcher bounds how many tasks a pool holds, so this wait is bounded too).

Breakers: every outcome (a timeout is a failure) feeds the agent's circuit breaker in a
``BreakerRegistry`` (``fleet.policy.breaker``); an agent whose breaker is open takes no
work, a half-open one only its probe calls. The registry caps the share of this host's
agents ejected at once and enters panic mode when too few are healthy.

Retries: a failed outcome that ``RetryPolicy.decide`` says to retry is not recorded;
``run_and_record`` hands its id and delay back to the dispatcher, which gives the item
back to the queue after that delay, so it is redelivered, possibly to another host.
Only the final failure is recorded.

Budgets (only when the fleet has a budget actor): a task holding an agent's slot
reserves its estimate before it runs and settles its actual cost after, through a
``BudgetClient`` that batches the calls (see ``_acquire_budgeted``); a task no agent may
afford fails with ``budget_exhausted``.

Recording: each task's final outcome is recorded in the ledger as soon as the task
finishes, not with its batch: outcomes wait at most ``RECORD_COALESCE_S`` and go to
their ledger shard in one call with every other outcome this host finished meanwhile
(``_buffer``). A host that dies mid-batch has its finished tasks recorded already, so
only the unfinished ones run again. Each outcome carries its delivery number, from
which the ledger counts duplicate executions; deliveries handed back for a retry are
*excused* in the same calls (``fleet.runtime.ledger``).

The host runs at most ``active`` agents: when the dispatcher lowers that number, the
agents above it are *draining*: they finish the task in hand and take no new one. A
watchdog cancels any task past ``task_timeout_s`` and fails it with reason ``timeout``;
one whose agent swallows the cancellation is *abandoned* ``hung_task_grace_s`` later
(``_watch``): it fails with ``timeout`` then, without holding its batch-mates, and
health restarts its agent (within the cascade guard's permits), whose slot then goes to
a fresh instance.

Health (``AgentHealthMixin``, ``fleet.runtime.host_health``): a health monitor over the
host's agents takes a failed agent out of the routable set at once and restarts it in
the host, within the fleet cascade guard's permits; see ARCHITECTURE.md for how breakers
and health relate.

Fleet-wide ejection cap: each host enforces ``max_ejected_share`` over its own agents,
so a pool whose hosts each run at least ``1 / max_ejected_share`` agents (10 for the
default 10%) never has more than that share ejected: sum_h floor(share * n_h) <=
share * sum_h n_h. Smaller hosts may each eject one agent (the registry always allows
one, so a small host can still take out its bad agent), which the pool-wide share then
exceeds by at most one agent per host. No cross-host coordination is needed on the hot
path.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NamedTuple, overload

import orjson
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from fleet.agent import Agent, Reply
from fleet.policy.breaker import (
    BreakerEvent,
    BreakerEventLog,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    EventKind,
)
from fleet.policy.retry import RetryPolicy, RetryVerdict
from fleet.policy.routing import (
    Candidate,
    CapacityRouter,
    FullScanRouter,
    LeastLoadedRouter,
    RandomRouter,
    RoundRobinRouter,
    RoutingHint,
    SpecializationRouter,
    make_router,
)
from fleet.runtime.host_health import AgentHealthMixin
from fleet.runtime.budget_client import BudgetClient, Grant, tenant_of
from fleet.runtime.imports import import_object
from fleet.spec.budgets import ModelPrice
from fleet.spec.pools import PoolSpec
from fleet.spec.resilience import ResilienceSpec, WindowKind
from fleet.spec.results import DEFAULT_MAX_OUTPUT_BYTES
from fleet.task import (
    IDEMPOTENT_PREFIX,
    Item,
    Outcome,
    Task,
    failed_outcome,
    item_to_task,
    payload_hash,
)

WATCHDOG_INTERVAL_S = 0.5
MAX_ERROR_CHARS = 2000
LATENCY_EWMA_ALPHA = 0.2
MAX_WAITERS_SCANNED = 32  # per wake-up, when the router refuses the oldest waiting task
STATS_EVENTS = 100
# A batch still running after PROGRESS_AFTER_S has a straggler: from then on its
# progress goes to the dispatcher every PROGRESS_INTERVAL_S. Batches that finish sooner
# (the usual case) send nothing: freeing their capacity piecemeal would only make the
# dispatcher send more, smaller batches.
PROGRESS_AFTER_S = 0.5
PROGRESS_INTERVAL_S = 0.25
PROGRESS_REPLY_S = 2.0  # a dispatcher restarting answers after this: report again later
# Budgets: an agent refused by its own budget is parked (keeps one slot taken) for the
# refusal's retry_after_s, at most BUDGET_PARK_MAX_S, then is asked again.
BUDGET_PARK_MAX_S = 60.0
BUDGET_REQUEUE = "budget_requeue"  # internal: every agent here is parked, requeue
REASON_BUDGET_EXHAUSTED = "budget_exhausted"
REASON_OUTPUT_TOO_LARGE = "output_too_large"
RECORD_RETRY_S = 60.0  # a ledger answering with storage errors, before the batch goes back
# Outcomes go to each ledger shard in one call per RECORD_COALESCE_S (from the first one
# waiting), or at once when RECORD_MAX_OUTCOMES wait: a few milliseconds of latency buy
# one ledger transaction for every task a host finishes meanwhile, across its batches.
RECORD_COALESCE_S = 0.005
RECORD_MAX_OUTCOMES = 512

# Routers that pick by load alone and learn nothing from outcomes.
_BALANCERS = (
    LeastLoadedRouter,
    FullScanRouter,
    RoundRobinRouter,
    RandomRouter,
    CapacityRouter,
)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (unit tests, local use)
        return uuid.uuid4().hex[:8]


def _is_storage_error(exc: BaseException) -> bool:
    from fleet.queue.storage import StorageError

    return isinstance(exc, StorageError) or isinstance(
        getattr(exc, "cause", None), StorageError
    )


def task_type(item: Item, task: Task) -> str:
    """The type a router keys success rates and expertise on: ``payload["type"]`` when
    the payload is an object with a string ``type``, else the capability."""
    p = task.payload
    if isinstance(p, dict):
        t = p.get("type")
        if isinstance(t, str):
            return t
    return item.capability


class BatchReport(NamedTuple):
    """What ``run_and_record`` tells the dispatcher about one batch.

    ``retry_ids`` are the items to give back to the queue, each after its
    ``retry_delays_s`` seconds (their outcome was not recorded); every other item has
    its outcome in the ledger. ``host`` is the host's ``pool_stats()``.
    """

    recorded: int
    retry_ids: list[str]
    retry_delays_s: list[float]
    host: dict[str, Any]


class _Batch:
    """A batch in ``run_and_record``: its items are recorded one by one as they finish
    (``_settle``), and the call replies once none is ``left``.

    ``done`` counts the items finished (their slots are free); ``recorded_ids`` the ids
    recorded so far, of which the first ``sent`` went to the dispatcher in progress
    reports (it acks them at once). ``report_from``: when reports start (see
    ``_report``); ``unknown``/``ids_sent``: its dispatcher said it does not know the
    batch, so its item ids are sent, once."""

    __slots__ = (
        "items",
        "left",
        "done",
        "recorded_ids",
        "sent",
        "retry_ids",
        "delays",
        "fut",
        "report_from",
        "unknown",
        "ids_sent",
        "error",
    )

    def __init__(self, items: list[Item], fut: asyncio.Future[None], report_from: float):
        self.items = items
        self.left = len(items)
        self.done = 0
        self.recorded_ids: list[str] = []
        self.sent = 0
        self.retry_ids: list[str] = []
        self.delays: list[float] = []
        self.fut = fut
        self.report_from = report_from
        self.unknown = False
        self.ids_sent = False
        self.error: BaseException | None = None
        if not items:
            fut.set_result(None)

    def settled(self) -> None:
        """One more item is settled (recorded, handed back, or failed to record); the
        batch replies once all are: never while one of its tasks still runs, so a
        failure cannot hand back work that is running."""
        self.left -= 1
        if self.left <= 0 and not self.fut.done():
            if self.error is None:
                self.fut.set_result(None)
            else:
                self.fut.set_exception(self.error)

    def failed(self, exc: BaseException) -> None:
        """One item could not be settled (``exc``): the batch fails once all are done."""
        if self.error is None:
            self.error = exc
        self.settled()


class _RecordBuffer:
    """Outcomes (and excusals, see ``fleet.runtime.ledger``) waiting for one ledger
    shard, with the batch of each outcome."""

    __slots__ = ("outcomes", "batches", "excused", "timer", "loop")

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.batches: list[_Batch] = []
        self.excused: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class _AllParked(Exception):
    """Every agent of the host is parked: its own budget is short."""


class _Ref:
    """An agent as the breaker registry sees it (``HasId``), with its slot index."""

    __slots__ = ("id", "index")

    def __init__(self, agent_id: str, index: int):
        self.id = agent_id
        self.index = index


class _AgentView(Sequence[Candidate]):
    """The routable agents as ``Candidate`` snapshots, built only when a router looks.

    A power-of-d router reads d of them per decision, so routing costs O(d), not O(n).
    """

    __slots__ = ("_h", "_idx")

    def __init__(self, host: AgentHost, idx: list[int]):
        self._h = host
        self._idx = idx

    def __len__(self) -> int:
        return len(self._idx)

    @overload
    def __getitem__(self, k: int) -> Candidate: ...
    @overload
    def __getitem__(self, k: slice) -> list[Candidate]: ...

    def __getitem__(self, k: int | slice) -> Candidate | list[Candidate]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self._idx)))]
        i = self._idx[k]
        h = self._h
        return Candidate(
            h._agent_ids[i], h._busy[i], h._c, h._lat[i], h._weight[i], h._expertise[i]
        )


class AgentHost(AgentHealthMixin):
    """The body of a pool's Serve deployment (see ``fleet.runtime.deploy``); agent
    health (heartbeats, restarts) lives in ``AgentHealthMixin``."""

    def __init__(
        self,
        pool: dict[str, Any],
        resilience: dict[str, Any] | None = None,
        prices: dict[str, Any] | None = None,
        controller: tuple[str, str] | None = None,
        ledger: tuple[str, str, int] | None = None,
        health: dict[str, Any] | None = None,
        budget: tuple[str, str] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ):
        self.pool = PoolSpec.model_validate(pool)
        self.resilience = ResilienceSpec.model_validate(resilience or {})
        self.prices = {k: ModelPrice.model_validate(v) for k, v in (prices or {}).items()}
        self.host_id = f"{self.pool.name}/{_replica_id()}"
        self._agent_cls: type[Agent] = import_object(self.pool.agent_class)
        self._controller_ref = controller
        self._ledger_ref = ledger
        self._ledger: Any = None  # a LedgerClient, made on first use
        self.max_output_bytes = max_output_bytes
        n = self.pool.agents_per_host
        self._c = self.pool.concurrency_per_agent
        self._agents: list[Agent | None] = [None] * n
        self._agent_ids = [f"{self.host_id}/{i}" for i in range(n)]
        self._refs = [_Ref(a, i) for i, a in enumerate(self._agent_ids)]
        self._busy = [0] * n
        self._lat = [0.0] * n  # EWMA of each agent's task time (seconds)
        self._weight = [1.0] * n
        self._expertise: list[frozenset[str]] = [frozenset()] * n
        self._active = 0

        # Routing. The fast path: with one slot per agent, every idle agent has load 0
        # and is least loaded, so least-loaded and full-scan routing may take any idle
        # agent: the one idle longest, in O(1) (dropping only the routers' latency
        # tie-break among idle agents). It is used while no breaker holds an agent out.
        self._router = make_router(self.pool.routing, clock=time.monotonic)
        self._rng = random.Random()
        self._learns = not isinstance(self._router, _BALANCERS)
        self._fast_kind = self._c == 1 and isinstance(
            self._router, (LeastLoadedRouter, FullScanRouter)
        )
        self._fast = self._fast_kind
        self._hinted = self._learns  # task-aware routers need a RoutingHint per task
        self._eager_setup = isinstance(self._router, SpecializationRouter)
        self._idle: deque[int] = deque()  # fast path: idle agents (entries may be stale)
        self._in_idle = [False] * n
        self._routable: list[int] = []  # active agents the breakers let through
        self._routable_set: set[int] | None = None  # None: all active agents
        self._probing: set[int] = set()  # routable agents whose breaker is half-open
        self._view = _AgentView(self, self._routable)
        self._free = 0  # free slots on routable agents
        self._waiters: deque[tuple[asyncio.Future[int], RoutingHint | None]] = deque()

        # Breakers and retries.
        self.events = BreakerEventLog()
        self._breakers = BreakerRegistry(
            self.resilience, time.monotonic, [self.events, self], name=self.host_id
        )
        self._brk: list[CircuitBreaker | None] = [None] * n
        # Deferred breaker feeds, exact for count windows (the default). Invariant: when
        # ``_clean[i]``, agent i's breaker is CLOSED and its window holds only fast
        # successes, so one more fast success can neither trip it nor change what a
        # later outcome does, except for the window's length: the host owes it
        # (``_owed[i]``, at most ``window_calls``) and feeds the owed successes just
        # before the next failure or slow call, or before its state is read for stats.
        # A window becomes clean when the breaker closes (it is cleared) or after
        # ``window_calls`` fast successes in a row (``_streak``) while closed. On a
        # healthy pool this makes the breakers nearly free. Time windows age their
        # calls, so they get every outcome at once.
        ab = self.resilience.agent_breaker
        self._defer = ab.enabled and ab.window is WindowKind.COUNT
        self._window_calls = ab.window_calls
        self._slow_call_s = ab.slow_call_duration_s
        self._clean = [self._defer] * n
        self._owed = [0] * n
        self._streak = [0] * n
        self._dirty = True  # a breaker changed state: recompute the routable agents
        self._recheck_at = math.inf  # when the next open breaker turns half-open
        self._retry = RetryPolicy(self.resilience.retry, time.monotonic, random.Random())
        self.retries = 0
        self.final_failures: Counter[str] = Counter()  # verdicts of unretried failures

        self._open_batches: dict[tuple[str, str, str, int], _Batch] = {}
        self._reporter: asyncio.Task[None] | None = None
        self._dispatchers: dict[tuple[str, str], Any] = {}
        self._running: dict[asyncio.Task[Any], float] = {}  # task -> start (monotonic)
        self._work: dict[asyncio.Task[Any], tuple[Item, _Batch]] = {}  # not abandoned
        self._records: list[_RecordBuffer] = []  # per ledger shard, made on first use
        self.abandoned = 0  # tasks whose agent ignored cancellation (see _watch)
        self._cancelled_at: dict[asyncio.Task[Any], float] = {}  # first cancel (_watch)
        self._watchdog: asyncio.Task[None] | None = None
        self.completed = 0
        self.failed = 0
        self._init_health(health)
        self._init_budget(budget)
        self.set_active(min(n, max(1, self.pool.autoscaling.start_agents)))

    # -- breakers ------------------------------------------------------------------
    def on_breaker_event(self, event: BreakerEvent) -> None:
        """Registry listener: any state change may change which agents are routable.

        An agent whose breaker turns half-open starts from a clean slate: its latency
        estimate and the router's success stats date from before it was ejected, and
        would keep the router away from it, starving the probe calls that decide its
        re-admission (and, once closed, the agent itself).
        """
        self._dirty = True
        if event.kind is not EventKind.TRANSITION:
            return
        agent_id = event.name.removeprefix("agent:")
        tail = agent_id.rsplit("/", 1)[-1]
        if not (tail.isdigit() and int(tail) < len(self._lat)):
            return
        i = int(tail)
        # OPEN and CLOSED clear the window; HALF_OPEN counts probes: feed everything.
        self._streak[i] = self._owed[i] = 0
        self._clean[i] = self._defer and event.new is BreakerState.CLOSED
        if event.new is BreakerState.HALF_OPEN:
            self._lat[i] = 0.0
            self._router.forget(agent_id)

    def _refresh(self) -> None:
        """Recompute the routable agents, the free slots and the fast-path state.

        O(active agents); runs only after a breaker changed state, when the active count
        changes, and when an open breaker's open duration has passed.
        """
        active = self._active
        reg = self._breakers
        routable = self._routable
        routable.clear()
        self._probing = set()
        self._recheck_at = math.inf
        out = self._health_out
        if not reg.ejected and not reg.panic and not out:
            routable.extend(range(active))
            self._routable_set = None
        else:
            # Agents health took out of service are not offered to the breakers at all:
            # panic mode may route to ejected agents, never to failed ones.
            refs = self._refs[:active]
            r = reg.routable([ref for ref in refs if ref.index not in out] if out else refs)
            keep = {ref.index for ref in r.candidates}
            routable.extend(i for i in range(active) if i in keep)
            self._routable_set = keep
            now = time.monotonic()
            for agent_id in reg.ejected:
                b = reg.agent(agent_id)
                idx = int(agent_id.rsplit("/", 1)[1])
                if idx in keep and not r.panic and b.state is not BreakerState.CLOSED:
                    self._probing.add(idx)
                until = b.open_until_s
                if until is not None:
                    self._recheck_at = min(self._recheck_at, until)
            if self._recheck_at <= now:
                self._recheck_at = now + WATCHDOG_INTERVAL_S
        c, busy = self._c, self._busy
        self._free = sum(max(0, c - busy[i]) for i in routable)
        self._fast = self._fast_kind and self._routable_set is None
        if self._fast:
            self._idle = deque(i for i in routable if busy[i] == 0)
            self._in_idle = [False] * len(busy)
            for i in self._idle:
                self._in_idle[i] = True
        # Transitions caused by reading the breakers above are already accounted for.
        self._dirty = False

    def _is_routable(self, i: int) -> bool:
        return i < self._active and (self._routable_set is None or i in self._routable_set)

    # -- slots ---------------------------------------------------------------------
    def set_active(self, agents: int) -> None:
        """Run ``agents`` logical agents here; the ones above it drain."""
        agents = max(1, min(agents, self.pool.agents_per_host))
        if agents == self._active:
            return
        self._active = agents
        self._breakers.sync_agents(self._agent_ids[:agents])
        for i in range(len(self._brk)):
            b = self._breakers.agent(self._agent_ids[i]) if i < agents else None
            if b is not self._brk[i]:  # a new (closed, empty) breaker, or none
                self._clean[i] = self._defer
                self._owed[i] = self._streak[i] = 0
            self._brk[i] = b
        self._health_sync()
        self._refresh()
        self._wake()

    def _take(self, i: int) -> int:
        self._busy[i] += 1
        self._free -= 1
        return i

    def _pick(self, hint: RoutingHint | None) -> int | None:
        """Choose an agent with a free slot and take the slot, or None: none may take it."""
        if self._dirty or (
            self._recheck_at != math.inf and time.monotonic() >= self._recheck_at
        ):
            self._refresh()
        while self._free > 0:
            if self._fast:
                idle, flags, busy, active = self._idle, self._in_idle, self._busy, self._active
                while idle:
                    i = idle.popleft()
                    flags[i] = False
                    if busy[i] == 0 and i < active:
                        return self._take(i)
                self._refresh()  # cannot happen while the counts are right; resync
                if self._fast and not self._idle:
                    return None
                continue
            j = self._router.choose(self._view, self._rng, hint)
            if j is None:
                return None
            i = self._routable[j]
            if i in self._probing and not self._breakers.acquire(self._agent_ids[i]):
                self._refresh()  # its probe permits are taken: it leaves the routable set
                continue
            return self._take(i)
        return None

    async def _acquire(self, hint: RoutingHint | None) -> int:
        i = self._pick(hint)
        if i is not None:
            return i
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, hint))
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled (timed out) after a slot was handed to it: give the slot back.
            if fut.done() and not fut.cancelled():
                self._release(fut.result())
            raise

    def _wake(self) -> None:
        """Hand free slots to waiting tasks, oldest first."""
        waiters = self._waiters
        k = 0
        while waiters and self._free > 0 and k < min(len(waiters), MAX_WAITERS_SCANNED):
            fut, hint = waiters[k]
            if fut.done():
                del waiters[k]
                continue
            i = self._pick(hint)
            if i is None:
                k += 1  # the router will not place this one now (e.g. waits for an expert)
                continue
            del waiters[k]
            fut.set_result(i)

    def _release(self, i: int) -> None:
        self._busy[i] -= 1
        if not self._is_routable(i):
            return  # draining or held out by its breaker: its slot is not handed out
        self._free += 1
        if self._fast and self._busy[i] == 0 and not self._in_idle[i]:
            self._idle.append(i)
            self._in_idle[i] = True
        if self._waiters:
            self._wake()

    def _observe(self, i: int, ok: bool, latency_s: float, kind: str | None) -> None:
        """Feed one finished task to the agent's latency EWMA, breaker and the router."""
        self._lat[i] += LATENCY_EWMA_ALPHA * (latency_s - self._lat[i])
        if ok:
            self._health_ok[i] += 1  # handed to the health monitor in bulk
        else:
            self._health_failed(i)
        b = self._brk[i]
        if b is not None:  # None: draining, no longer in the registry
            if ok and latency_s < self._slow_call_s:
                if self._clean[i]:
                    if self._owed[i] < self._window_calls:
                        self._owed[i] += 1
                else:
                    b.record(True, latency_s)
                    self._streak[i] += 1
                    if (
                        self._defer
                        and self._streak[i] >= self._window_calls
                        and b.state is BreakerState.CLOSED
                    ):
                        self._clean[i] = True
            else:
                self._pay(i)
                self._clean[i] = False
                self._streak[i] = 0
                b.record(ok, latency_s)
        if self._learns:
            self._router.record_outcome(self._agent_ids[i], ok, kind)

    def _pay(self, i: int) -> None:
        """Feed agent i's breaker the fast successes the host owes it (see _clean)."""
        owed, self._owed[i] = self._owed[i], 0
        b = self._brk[i]
        if b is not None:
            for _ in range(owed):
                b.record(True, None)

    def _new_agent(self, i: int) -> Agent:
        """A fresh instance of logical agent i (not set up yet), wired to the host's
        dependency breakers. Used on first use and by health restarts."""
        agent = self._agent_cls(self._agent_ids[i], **self.pool.agent_kwargs)
        agent.dependency_breaker = self._breakers.dependency
        return agent

    async def _agent(self, i: int) -> Agent:
        agent = self._agents[i]
        if agent is None:
            agent = self._new_agent(i)
            await agent.setup()
            self._agents[i] = agent
            # Optional agent attributes the routers use: expertise (task types it is
            # best at) and weight (relative speed of one slot).
            self._expertise[i] = frozenset(getattr(agent, "expertise", ()) or ())
            self._weight[i] = float(getattr(agent, "weight", 1.0))
        return agent

    # -- work ----------------------------------------------------------------------
    async def run_and_record(
        self,
        items: list[Item],
        active_agents: int | None = None,
        progress: tuple[str, str, str, int] | None = None,
    ) -> BatchReport:
        """Run a batch, recording each item's final outcome in the ledger as soon as it
        finishes; reply once every item is recorded or handed back for a retry.

        Records go out coalesced per ledger shard (``RECORD_COALESCE_S``), never one
        call per task, so a host that dies mid-batch loses only the items that had not
        finished. The dispatcher acks an item only once it is recorded: from this reply,
        or earlier from a progress report. Failures to retry are not recorded: their
        ids and delays come back in the report for the dispatcher to give back to the
        queue.

        ``progress`` is (dispatcher actor name, namespace, pool, batch id): once the
        batch has run for ``PROGRESS_AFTER_S``, the host tells that dispatcher how many
        of its items have finished (their agent slots count as free before the slowest
        item of the batch is done) and which are recorded (it acks those at once).
        """
        if active_agents is not None:
            self.set_active(active_agents)
        loop = asyncio.get_running_loop()
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch())
            self._ensure_health_loop()
        if self._eager_setup:
            # Specialization needs every agent's expertise before the first choice.
            self._eager_setup = False
            await asyncio.gather(*(self._agent(i) for i in range(self._active)))
        now = time.monotonic()
        batch = _Batch(items, loop.create_future(), now + PROGRESS_AFTER_S)
        if progress is not None:
            self._open_batches[progress] = batch
            if self._reporter is None:
                self._reporter = loop.create_task(self._report())
        firsts = sum(1 for it in items if it.deliveries <= 1)
        if firsts:
            self._retry.record_request(firsts)
        running, work = self._running, self._work
        for it in items:
            t = loop.create_task(self._run_item(it, batch))
            running[t] = now
            work[t] = (it, batch)
        try:
            await batch.fut
        finally:
            if progress is not None:
                self._open_batches.pop(progress, None)
        if self._budget is not None:
            await self._budget.flush()  # one settle call per batch
        return BatchReport(
            len(batch.recorded_ids), batch.retry_ids, batch.delays, self.pool_stats()
        )

    async def _run_item(self, item: Item, batch: _Batch) -> None:
        cur = asyncio.current_task()
        try:
            o = await self._run_one(item)
        except BaseException as exc:  # a bug here must fail the batch, not hang it
            if self._work.pop(cur, None) is not None:  # type: ignore[arg-type]
                batch.done += 1
                batch.failed(exc)
            raise
        finally:
            self._running.pop(cur, None)  # type: ignore[arg-type]
            self._cancelled_at.pop(cur, None)  # type: ignore[arg-type]
        if self._work.pop(cur, None) is not None:  # type: ignore[arg-type]
            batch.done += 1  # its slot is free: progress reports free it in the pool
            try:
                self._settle(item, o, batch)
            except Exception as exc:  # e.g. no ledger: the batch fails, it does not hang
                batch.failed(exc)
                raise
        # else abandoned (see _watch): settled and counted done already; the late end
        # of a wedged agent changes nothing.

    def _settle(self, item: Item, o: Outcome, batch: _Batch, final: bool = False) -> None:
        """A task's final word: handed back for a retry, or queued for recording
        (``final``: recorded as it is, never retried)."""
        if not o.ok and not final:
            o, delay = self._decide_retry(item, o)
            if delay is not None:
                batch.retry_ids.append(item.id)
                batch.delays.append(delay)
                # This delivery ran no duplicate: tell the ledger with the next records.
                self._buffer(item.id, None, batch)
                batch.settled()
                return
        if o.task_id.startswith(IDEMPOTENT_PREFIX):
            # Keyed tasks carry their payload's hash, so a later submission of the key
            # with another payload is refused rather than answered with this outcome.
            o = o._replace(payload_hash=payload_hash(item.payload))
        self._buffer(o.task_id, o, batch)

    def _buffer(self, task_id: str, o: Outcome | None, batch: _Batch) -> None:
        """Queue an outcome (or, with None, an excusal) for its ledger shard; the shard's
        buffer goes out ``RECORD_COALESCE_S`` after its first entry, or at once when it
        holds ``RECORD_MAX_OUTCOMES``."""
        if not self._records:
            if self._ledger is None:
                from fleet.runtime.ledger import LedgerClient

                if self._ledger_ref is None:
                    raise RuntimeError(f"host {self.host_id} has no ledger to record in")
                self._ledger = LedgerClient(*self._ledger_ref)
            self._records = [_RecordBuffer() for _ in range(self._ledger.n)]
        k = self._ledger.shard_of(task_id) if len(self._records) > 1 else 0
        buf = self._records[k]
        if o is None:
            buf.excused.append(task_id)
        else:
            buf.outcomes.append(o)
            buf.batches.append(batch)
        if len(buf.outcomes) >= RECORD_MAX_OUTCOMES:
            self._flush(k)
        elif buf.timer is None or buf.loop is not (loop := asyncio.get_running_loop()):
            # (A timer of another loop: a test ran the host under asyncio.run before.)
            buf.loop = loop = asyncio.get_running_loop()
            buf.timer = loop.call_later(RECORD_COALESCE_S, self._flush, k)

    def _flush(self, k: int) -> None:
        buf = self._records[k]
        if buf.timer is not None:
            buf.timer.cancel()
        self._records[k] = _RecordBuffer()
        if buf.outcomes or buf.excused:
            asyncio.get_running_loop().create_task(
                self._record(k, buf.outcomes, buf.batches, buf.excused)
            )

    async def _record(
        self, k: int, outcomes: list[Outcome], batches: list[_Batch], excused: list[str]
    ) -> None:
        """Record final outcomes on ledger shard ``k``; each batch hears of its own once
        they are durable.

        A ledger shard that dies is restarted by Ray and the call retried on it (the
        shards are created with ``max_task_retries=-1``), so a restart only delays this.
        A shard that answers with a storage error (a full disk) is asked again with
        backoff for up to ``RECORD_RETRY_S``; the batch's leases are renewed by the
        dispatcher meanwhile, and past that the batch fails and is handed back (its
        unrecorded items only), never dropped.
        """
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_storage_error),
                wait=wait_exponential(multiplier=0.05, max=2.0),
                stop=stop_after_delay(RECORD_RETRY_S),
                reraise=True,
            ):
                with attempt:
                    await self._ledger.record_shard_async(k, outcomes, excused)
        except Exception as exc:
            for b in batches:
                b.failed(exc)  # each batch fails once its other items are settled
            return
        for o, b in zip(outcomes, batches):
            b.recorded_ids.append(o.task_id)
            b.settled()

    def _decide_retry(self, item: Item, o: Outcome) -> tuple[Outcome, float | None]:
        """A failed outcome: (outcome, delay) to retry after ``delay`` seconds, or
        (final outcome, None) to record. Attempts are the item's deliveries, capped at
        ``max_deliveries`` so the queue never exhausts an item we meant to retry."""
        if o.reason == BUDGET_REQUEUE:
            return self._budget_requeue(item, o)
        left = (item.deadline_unix_s - time.time()) if item.deadline_unix_s else None
        d = self._retry.decide(
            max(1, item.deliveries),
            o.reason,
            o.error,
            task_max_attempts=self.resilience.max_deliveries,
            time_left_s=left,
        )
        if d.retry:
            self.retries += 1
            return o, d.delay_s
        self.final_failures[d.verdict.value] += 1
        if d.verdict is RetryVerdict.NOT_RETRYABLE:
            return o, None
        why = (
            f"{d.verdict.value} after attempt {max(1, item.deliveries)}: {o.reason}: {o.error}"
        )
        return o._replace(reason=d.verdict.value, error=why[:MAX_ERROR_CHARS]), None

    async def _report(self) -> None:
        """Tell dispatchers how far their long-running batches are (see run_and_record).

        Every batch older than ``PROGRESS_AFTER_S`` is reported each interval, changed
        or not: the report doubles as the batch's heartbeat. A dispatcher that does not
        know a batch (it was restarted and adopts its predecessor's leases) answers with
        its id, and the batch's item ids follow in the next report, so the new
        dispatcher keeps them leased while they run here.
        """
        import ray

        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            news: dict[tuple[str, str, str], dict[int, int]] = {}
            running: dict[tuple[str, str, str], dict[int, list[str]]] = {}
            recorded: dict[tuple[str, str, str], dict[int, list[str]]] = {}
            marks: dict[tuple[str, str, str], list[tuple[_Batch, int]]] = {}
            now = time.monotonic()
            for (name, ns, pool, bid), b in self._open_batches.items():
                if now >= b.report_from:
                    key = (name, ns, pool)
                    news.setdefault(key, {})[bid] = b.done
                    if len(b.recorded_ids) > b.sent:
                        recorded.setdefault(key, {})[bid] = b.recorded_ids[b.sent :]
                        marks.setdefault(key, []).append((b, len(b.recorded_ids)))
                    if b.unknown and not b.ids_sent:  # send the ids once
                        b.ids_sent = True
                        running.setdefault(key, {})[bid] = [it.id for it in b.items]
            for (name, ns, pool), counts in news.items():
                key = (name, ns, pool)
                try:
                    d = self._dispatchers.get((name, ns))
                    if d is None:
                        d = self._dispatchers[(name, ns)] = ray.get_actor(name, namespace=ns)
                    unknown = await asyncio.wait_for(
                        d.batch_progress.remote(
                            pool, counts, running.get(key), recorded.get(key)
                        ),
                        PROGRESS_REPLY_S,
                    )
                except Exception:
                    self._dispatchers.pop((name, ns), None)  # gone or restarting
                    continue
                for b, upto in marks.get(key, ()):
                    b.sent = upto
                for bid in unknown:
                    b = self._open_batches.get((name, ns, pool, bid))
                    if b is not None:
                        b.unknown = True

    async def _run_one(self, item: Item) -> Outcome:
        task: Task | None = None
        hint: RoutingHint | None = None
        kind: str | None = None
        if self._hinted:
            task = item_to_task(item)
            kind = task_type(item, task)
            hint = RoutingHint(kind, item.affinity_key)
        grant: Grant | None = None
        try:
            if self._budget is None:
                i = await self._acquire(hint)
            else:
                got = await self._acquire_budgeted(item, task, hint)
                if isinstance(got, Outcome):  # refused: no agent here may run it
                    return got
                i, grant = got
        except asyncio.CancelledError:
            self.failed += 1  # timed out waiting for an agent: no agent to blame
            return failed_outcome(
                item,
                "timeout",
                f"exceeded task_timeout_s={self.resilience.task_timeout_s} "
                "waiting for a free agent",
                self.pool.name,
            )
        agent_id = self._agent_ids[i]
        cur = asyncio.current_task()
        self._on_agent[cur] = (i, item.id)  # type: ignore[index]  # for hung-task health
        started = time.time()
        ok = False
        spent: tuple[float, int] | None = None  # (USD, tokens) of a completed task
        try:
            agent = self._agents[i] or await self._agent(i)
            reply = await agent.handle(task or item_to_task(item))
            if not isinstance(reply, Reply):
                reply = Reply(reply)
            output = orjson.dumps(reply.output)
            if len(output) > self.max_output_bytes:
                self.failed += 1
                return failed_outcome(
                    item,
                    REASON_OUTPUT_TOO_LARGE,
                    f"output is {len(output)} bytes encoded, over results.max_output_bytes"
                    f"={self.max_output_bytes}",
                    self.pool.name,
                    agent_id,
                    started,
                )
            price = self.prices.get(reply.model or "")
            cost = price.cost_usd(reply.input_tokens, reply.output_tokens) if price else 0.0
            spent = (cost, reply.input_tokens + reply.output_tokens)
            self.completed += 1
            ok = True
            return Outcome(
                item.id,
                True,
                output,
                None,
                None,
                agent_id,
                self.pool.name,
                item.deliveries,
                item.submitted_unix_s,
                started,
                time.time(),
                reply.input_tokens,
                reply.output_tokens,
                cost,
            )
        except asyncio.CancelledError:
            self.failed += 1
            return failed_outcome(
                item,
                "timeout",
                f"exceeded task_timeout_s={self.resilience.task_timeout_s}",
                self.pool.name,
                agent_id,
                started,
            )
        except orjson.JSONEncodeError as exc:
            self.failed += 1
            return failed_outcome(
                item,
                "bad_output",
                f"output is not JSON: {exc}",
                self.pool.name,
                agent_id,
                started,
            )
        except Exception as exc:  # the agent's own failure: recorded, the host lives on
            self.failed += 1
            text = "".join(traceback.format_exception_only(exc)).strip()
            return failed_outcome(
                item, "error", text[:MAX_ERROR_CHARS], self.pool.name, agent_id, started
            )
        finally:
            if grant is not None:
                self._settle_budget(grant, spent)
            # An orphan's agent was restarted under it and already got its slot back.
            if self._on_agent.pop(cur, (i,))[0] == i:  # type: ignore[arg-type]
                self._observe(i, ok, time.time() - started, kind)
                self._release(i)

    # -- budgets ---------------------------------------------------------------------
    def _init_budget(self, budget: tuple[str, str] | None) -> None:
        """Budget state; with no budget actor (no budgets in the spec) the host never
        reserves and pays one ``is None`` check per task."""
        self._budget: BudgetClient | None = BudgetClient(budget) if budget else None
        self._parked_slots = 0  # slots held by agents whose own budget is short
        self._requeue_after: dict[str, float] = {}  # item id -> delay before redelivery
        self._budget_retry_after_s = BUDGET_PARK_MAX_S

    async def _acquire_budgeted(
        self, item: Item, task: Task | None, hint: RoutingHint | None
    ) -> tuple[int, Grant] | Outcome:
        """An agent slot and a budget reservation for the task, or its outcome.

        Granted: (agent, grant). Refused by the agent's own budget: the agent is parked
        and the task tries another agent here; when every agent here is parked, the task
        goes back to the queue (``BUDGET_REQUEUE``) for another host or for later.
        Refused by a shared budget (fleet, pool, tenant): no agent may run it, the task
        fails with ``budget_exhausted``. The slot is released on every path but a grant.
        """
        tenant = tenant_of(task.payload if task is not None else orjson.loads(item.payload))
        while True:
            try:
                if self._all_parked():
                    raise _AllParked
                i = await self._acquire(hint)
            except _AllParked:  # every agent here is out of its own budget (see _park)
                self._requeue_after.setdefault(item.id, self._budget_retry_after_s)
                return failed_outcome(
                    item,
                    BUDGET_REQUEUE,
                    f"every agent on host {self.host_id} is out of its own budget",
                    self.pool.name,
                )
            try:
                g = await self._budget.reserve(  # type: ignore[union-attr]
                    self._agent_ids[i], self.pool.name, tenant
                )
            except BaseException as exc:
                self._release(i)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # The budget actor is unavailable: fail retryably, nothing runs unbooked.
                return failed_outcome(
                    item,
                    "error",
                    repr(exc)[:MAX_ERROR_CHARS],
                    self.pool.name,
                    self._agent_ids[i],
                )
            if g.reservation_id is not None:
                return i, g
            if not g.retry_elsewhere:
                self._release(i)
                self.failed += 1
                return failed_outcome(
                    item, REASON_BUDGET_EXHAUSTED, g.detail, self.pool.name, self._agent_ids[i]
                )
            self._park(i, g.retry_after_s)

    def _all_parked(self) -> bool:
        return self._parked_slots > 0 and self._parked_slots >= len(self._routable) * self._c

    def _park(self, i: int, after_s: float) -> None:
        """Keep one of agent i's slots taken for ``after_s`` (its budget is short).

        When that parks every slot here, the tasks waiting for a slot would wait for
        the first unpark: they get ``_AllParked`` instead and go back to the queue."""
        self._parked_slots += 1
        self._budget_retry_after_s = min(after_s, BUDGET_PARK_MAX_S)
        asyncio.get_running_loop().call_later(self._budget_retry_after_s, self._unpark, i)
        if self._all_parked():
            while self._waiters:
                fut, _ = self._waiters.popleft()
                if not fut.done():
                    fut.set_exception(_AllParked())

    def _unpark(self, i: int) -> None:
        self._parked_slots -= 1
        self._release(i)

    def _settle_budget(self, grant: Grant, spent: tuple[float, int] | None) -> None:
        """Queue the settlement (sent with the batch): a completed task at its actual
        cost, any other at its estimate (it may have spent before failing)."""
        if spent is None:
            self._budget.settle_at_estimate(grant)  # type: ignore[union-attr]
        else:
            self._budget.settle(grant, spent[0], spent[1])  # type: ignore[union-attr]

    def _budget_requeue(self, item: Item, o: Outcome) -> tuple[Outcome, float | None]:
        """Every agent here is out of its own budget: redeliver the task later (maybe
        to another host), or fail it with ``budget_exhausted`` on its last delivery."""
        delay = self._requeue_after.pop(item.id, BUDGET_PARK_MAX_S)
        if item.deliveries + 1 >= self.resilience.max_deliveries:
            self.failed += 1
            return o._replace(reason=REASON_BUDGET_EXHAUSTED), None
        self.retries += 1
        return o, delay

    async def _watch(self) -> None:
        """Cancel tasks past ``task_timeout_s``; abandon those that ignore it.

        A task still running ``hung_task_grace_s`` after its first cancel has an agent
        that swallows cancellation (wedged): the task is *abandoned*: it fails with
        reason ``timeout`` now (recorded, not retried: it would wedge another agent), so
        its batch-mates are not held, and its late end, if any, changes nothing. Its
        agent is health's business: the same rule reports it hung
        (``AgentHealthMixin._find_hung``), and the restart that follows (within the
        cascade guard's permits) gives its slot to a fresh instance. After a stall of
        the event loop longer than the grace, no task is abandoned on that pass: its
        cancel has not been delivered yet.
        """
        limit = self.resilience.task_timeout_s
        grace = self.health_spec.hung_task_grace_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            stalled = now - last > WATCHDOG_INTERVAL_S + max(grace, WATCHDOG_INTERVAL_S)
            last = now
            cancelled = self._cancelled_at
            for t, t0 in list(self._running.items()):
                if now - t0 <= limit or t.done():
                    continue
                t.cancel()  # again each pass: a wedged agent may catch one and not the next
                first = cancelled.setdefault(t, now)
                if not stalled and now - first >= grace and t in self._work:
                    self._abandon(t, now - t0)
            # Open breakers turn half-open with time alone; let waiting tasks see it.
            if self._breakers.ejected or self._dirty:
                self._refresh()
                self._wake()

    def _abandon(self, t: asyncio.Task[Any], age_s: float) -> None:
        item, batch = self._work.pop(t)
        self.abandoned += 1
        batch.done += 1
        try:
            i = self._on_agent.get(t, (None,))[0]
            agent_id = self._agent_ids[i] if i is not None and i >= 0 else None
            self._settle(
                item,
                failed_outcome(
                    item,
                    "timeout",
                    f"exceeded task_timeout_s={self.resilience.task_timeout_s} "
                    f"and ignored cancellation for {age_s - self.resilience.task_timeout_s:.1f} s:"
                    " abandoned (its agent is restarted)",
                    self.pool.name,
                    agent_id,
                ),
                batch,
                final=True,
            )  # not retried: it would wedge another agent
        except Exception as exc:  # never kill the watchdog: fail this batch instead
            batch.failed(exc)

    # -- signals -------------------------------------------------------------------
    def pool_stats(self) -> dict[str, Any]:
        """Compact per-host counts for the dispatcher's per-pool status (cheap: it
        rides on every batch reply)."""
        reg = self._breakers
        return {
            "host": self.host_id,
            "agents": self._active,
            "ejected": len(reg.ejected),
            "max_ejected": reg.max_ejected,
            "panic": reg.panic,
            "retries": self.retries,
            "retry_budget_denied": self._retry.budget.denied,
        }

    async def stats(self, events: int | None = STATS_EVENTS) -> dict[str, Any]:
        """Load, outcomes, breakers (snapshot and the last ``events`` breaker events,
        all kept ones if None) and retries of this host.

        Async so that it runs on the host's event loop: Serve runs sync methods in a
        thread pool, and reading the breakers advances their state."""
        for i in range(self._active):
            if self._owed[i]:
                self._pay(i)  # so the breakers' counts are complete
        cap = self._active * self._c
        mono, wall = time.monotonic(), time.time()
        kept = list(self.events.events)
        if events is not None:
            kept = kept[-events:] if events > 0 else []
        return {
            "host": self.host_id,
            "active_agents": self._active,
            "draining_agents": sum(
                1 for i in range(self._active, len(self._busy)) if self._busy[i]
            ),
            "in_flight": sum(self._busy),
            "capacity": cap,
            "waiting": len(self._waiters),
            "budget_parked_slots": self._parked_slots,
            "completed": self.completed,
            "failed": self.failed,
            "abandoned": self.abandoned,
            "retries": self.retries,
            "final_failures": dict(self.final_failures),
            "retry_budget": self._retry.budget.snapshot(),
            "router": self.pool.routing.router.value,
            "breakers": self._breakers.snapshot(),
            "breaker_event_counts": dict(self.events.counts),
            "breaker_events": [_event_dict(e, mono, wall) for e in kept],
            "health": self.health_stats(events),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Per-replica load for fleet's Serve request router (plain reads of counters,
        safe from Serve's thread pool)."""
        return {
            "in_flight": sum(self._busy) + len(self._waiters),
            "capacity": self._active * self._c,
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The pool's desired host count, as decided by fleet's controller.

        Serve's controller reads this through fleet's custom autoscaling policy; the
        question to fleet's controller is asked here, in the replica, so Serve's
        controller never blocks on an actor call.
        """
        self._ensure_health_loop()
        if self._controller_ref is None:
            return {}
        import ray

        name, namespace = self._controller_ref
        try:
            ctl = ray.get_actor(name, namespace=namespace)
            # The agents' health rides on the same call; the reply carries the fleet
            # cascade guard's verdict (see AgentHealthMixin).
            reply = await asyncio.wait_for(
                ctl.host_report.remote(self.pool.name, self.health_report()), 2.0
            )
        except Exception:
            return {}  # missing metric: the policy holds the current count
        self.apply_health_verdict(reply["health"])
        return {"desired_hosts": float(reply["desired_hosts"])}

    async def check_health(self) -> None:
        """Serve's health probe. A host with a stuck event loop fails to answer at all;
        one whose agents all stay failed despite in-host restarts (and no fleet-wide
        cascade holds restarts back) raises, so Serve replaces it."""
        self._ensure_health_loop()
        problem = self.health_problem()
        if problem is not None:
            raise RuntimeError(f"host {self.host_id}: {problem}")


def _event_dict(e: BreakerEvent, now_mono: float, now_unix: float) -> dict[str, Any]:
    d = asdict(e)
    d["kind"] = e.kind.value
    d["old"] = e.old.value if e.old is not None else None
    d["new"] = e.new.value if e.new is not None else None
    d["at_unix_s"] = now_unix - (now_mono - e.at_s)
    return d


__all__ = ["AgentHost", "BatchReport", "EventKind", "task_type"]
