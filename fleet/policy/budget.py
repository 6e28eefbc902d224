"""Budget enforcement: reserve before a task runs, settle after, and never overspend.

Budgets are counters in a ``BudgetStore``: one per (budget key, window), where a key names
a scope, a resource and a window, e.g. ``agent:a17:usd:daily`` or ``pool:support:tokens:
hourly``, and the window index is ``floor(now / window_s)``. Amounts are integers in
fixed units (micro-USD, tokens, milli-CPU-seconds), so the arithmetic is exact.

**Reserve, then settle.** Before a task runs, the runtime reserves its *estimated
maximum* cost (``reserve``) on every budget the task falls under: the fleet's, its
agent's, its pool's and its tenant's. The store checks and books all of them in one
atomic step (all or nothing). After the task, ``settle`` replaces the reservation by the
actual usage, giving back what was not used. Invariant per counter, for every store
call: ``used + reserved <= limit``; ``try_reserve`` only books an amount that fits, and
``settle`` books ``actual <= reserved`` in place of ``reserved``. So however many tasks
race for the last dollar, their total cannot exceed the limit. The one way past it is a
task that uses more than it reserved: that is recorded as ``overrun`` (the truth is
never hidden) and the runtime must prevent it by passing the reservation to the agent as
a hard cap (e.g. ``max_tokens``). A refused reservation returns reason
``budget_exhausted``, the budget that refused, and whether another agent may take the
task (only the agent's own budget was short).

**Allocation and preemption.** With ``daily_usd`` set, each agent's daily USD limit is
its share of the fleet budget, computed by ``fleet.policy.allocation.allocate`` over the
agents present (``rebalance``, every ``rebalance_interval_s`` and whenever agents join or
leave): what it already used is kept, minimums go to higher priority classes first,
and the surplus (strictly or by weight) to the highest classes first, so under overload
low-priority agents lose their share first. Agents that left keep counting what they
spent. Classes with ``reserve_for_growth`` hold back the minimum of every agent that may
still join them.

**Monitoring.** Spend and burn rate (USD per hour over ``burn_rate_window_s``) per agent,
pool, tenant, class and fleet; an alert each time a budget's usage passes one of
``alert_thresholds`` of its limit (once per window).

One ``BudgetPolicy`` per fleet (in a controller or budget actor); the store may be shared
(a Ray actor wrapping ``InMemoryBudgetStore``, later a database). Time comes from the
injected ``clock`` (seconds; a Unix clock aligns days to UTC midnight).

**Durability.** The policy does no I/O. A runtime that must survive restarts keeps the
store's counters durable (``fleet.runtime.budget_store.SqliteBudgetStore``) and the
rest of the state as ``PolicyState``: ``take_changes`` after each call, ``restore`` on
a new policy at start.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple, Protocol

from fleet.policy.allocation import Allocation, Claim, Policy, Preemption, allocate
from fleet.policy.breaker import TimeBuckets
from fleet.spec.budgets import (
    DAY_S,
    HOUR_S,
    WINDOW_S,
    BudgetsSpec,
    ModelPrice,
    ScopeLimits,
)
from fleet.spec.fleet import FleetSpec

Clock = Callable[[], float]

REASON_EXHAUSTED = "budget_exhausted"
FLEET = "all"
DEFAULT_ALERT_LOG_SIZE = 1_000


class Resource(str, Enum):
    USD = "usd"
    TOKENS = "tokens"
    CPU_S = "cpu_s"


SCALE = {Resource.USD: 1_000_000, Resource.TOKENS: 1, Resource.CPU_S: 1_000}
"""Integer units per unit of each resource: micro-USD, tokens, milli-CPU-seconds."""


def to_units(resource: Resource, amount: float) -> int:
    """An amount of usage in integer units, rounded up (usage is never under-counted)."""
    if not amount >= 0:
        raise ValueError(f"{resource.value} amount {amount} must be >= 0")
    return math.ceil(round(amount * SCALE[resource], 3))


def limit_units(resource: Resource, amount: float) -> int:
    """A limit in integer units, rounded down (a limit is never over-granted)."""
    return math.floor(round(amount * SCALE[resource], 3))


def from_units(resource: Resource, units: int) -> float:
    return units / SCALE[resource]


@dataclass(frozen=True, slots=True)
class Usage:
    """What a task costs (an estimate before, the actual after): USD, tokens, CPU s."""

    usd: float = 0.0
    tokens: int = 0
    cpu_s: float = 0.0

    def amount(self, resource: Resource) -> float:
        return {
            Resource.USD: self.usd,
            Resource.TOKENS: self.tokens,
            Resource.CPU_S: self.cpu_s,
        }[resource]

    @classmethod
    def of_llm(
        cls, price: ModelPrice, input_tokens: int, output_tokens: int, cpu_s: float = 0.0
    ) -> Usage:
        """The usage of an LLM call; for an estimate pass the maximum tokens."""
        return cls(
            price.cost_usd(input_tokens, output_tokens), input_tokens + output_tokens, cpu_s
        )


def budget_key(scope: str, name: str, resource: Resource | str, window: str) -> str:
    return f"{scope}:{name}:{Resource(resource).value}:{window}"


def parse_key(key: str) -> tuple[str, str, Resource, str]:
    scope, rest = key.split(":", 1)
    name, resource, window = rest.rsplit(":", 2)
    return scope, name, Resource(resource), window


def window_index(window: str, now_s: float) -> int:
    return math.floor(now_s / WINDOW_S[window])


def window_end_s(key: str, index: int) -> float:
    """When window ``index`` of budget ``key`` ends (seconds on the policy's clock)."""
    return (index + 1) * WINDOW_S[parse_key(key)[3]]


Entry = tuple[str, int]
"""A counter: (budget key, window index)."""


# --- storage ------------------------------------------------------------------------------


class CounterView(NamedTuple):
    limit: int | None  # None: no limit
    used: int
    reserved: int

    @property
    def available(self) -> int | None:
        return None if self.limit is None else self.limit - self.used - self.reserved


class StoreRefusal(NamedTuple):
    """The first counter a reservation did not fit in."""

    entry: Entry
    limit: int
    used: int
    reserved: int
    asked: int


class BudgetStore(Protocol):
    """Shared budget state; every method is atomic. Plain data in and out, so a Ray
    actor (or a database) can implement it. Limits are per key (all windows)."""

    def set_limits(self, limits: Mapping[str, int | None]) -> None: ...

    def try_reserve(
        self, reservation_id: str, amounts: Mapping[Entry, int]
    ) -> StoreRefusal | None:
        """Book ``amounts`` on every counter if all fit (None), else nothing."""
        ...

    def settle(
        self, reservation_id: str, actual: Mapping[Entry, int]
    ) -> dict[Entry, int] | None:
        """Replace the reservation by ``actual``; returns the overruns (actual beyond
        reserved) per counter, or None if the reservation is unknown (already settled
        or released: settling twice never counts twice)."""
        ...

    def release(self, reservation_id: str) -> bool: ...

    def counters(self, entries: Iterable[Entry]) -> dict[Entry, CounterView]: ...

    def expire(self, min_index: Mapping[str, int]) -> int:
        """Drop counters of windows (by window name) older than ``min_index`` that hold
        no reservation; returns how many were dropped."""
        ...


class InMemoryBudgetStore:
    """The in-process ``BudgetStore``: dictionaries behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limits: dict[str, int | None] = {}
        self._used: dict[Entry, int] = {}
        self._reserved: dict[Entry, int] = {}
        self._reservations: dict[str, dict[Entry, int]] = {}

    def set_limits(self, limits: Mapping[str, int | None]) -> None:
        with self._lock:
            self._limits.update(limits)

    def try_reserve(
        self, reservation_id: str, amounts: Mapping[Entry, int]
    ) -> StoreRefusal | None:
        with self._lock:
            if reservation_id in self._reservations:
                raise ValueError(f"reservation {reservation_id} already exists")
            for entry, amount in amounts.items():
                if amount < 0:
                    raise ValueError(f"negative amount {amount} for {entry}")
                limit = self._limits.get(entry[0])
                if limit is None:
                    continue
                used = self._used.get(entry, 0)
                reserved = self._reserved.get(entry, 0)
                if used + reserved + amount > limit:
                    return StoreRefusal(entry, limit, used, reserved, amount)
            for entry, amount in amounts.items():
                self._reserved[entry] = self._reserved.get(entry, 0) + amount
            self._reservations[reservation_id] = dict(amounts)
            return None

    def settle(
        self, reservation_id: str, actual: Mapping[Entry, int]
    ) -> dict[Entry, int] | None:
        with self._lock:
            booked = self._reservations.pop(reservation_id, None)
            if booked is None:
                return None
            overruns = {}
            for entry, amount in booked.items():
                self._reserved[entry] -= amount
                spent = actual.get(entry, 0)
                if spent < 0:
                    raise ValueError(f"negative usage {spent} for {entry}")
                self._used[entry] = self._used.get(entry, 0) + spent
                if spent > amount:
                    overruns[entry] = spent - amount
            return overruns

    def release(self, reservation_id: str) -> bool:
        with self._lock:
            booked = self._reservations.pop(reservation_id, None)
            if booked is None:
                return False
            for entry, amount in booked.items():
                self._reserved[entry] -= amount
            return True

    def counters(self, entries: Iterable[Entry]) -> dict[Entry, CounterView]:
        with self._lock:
            return {
                e: CounterView(
                    self._limits.get(e[0]), self._used.get(e, 0), self._reserved.get(e, 0)
                )
                for e in entries
            }

    def expire(self, min_index: Mapping[str, int]) -> int:
        with self._lock:
            old = [
                e
                for e in set(self._used) | set(self._reserved)
                if e[1] < min_index.get(e[0].rpartition(":")[2], e[1])
                and not self._reserved.get(e, 0)
            ]
            for e in old:
                self._used.pop(e, None)
                self._reserved.pop(e, None)
            return len(old)

    @property
    def open_reservations(self) -> int:
        return len(self._reservations)


class AsyncBudgetStore(Protocol):
    """The same store seen through awaitable calls (e.g. a Ray actor handle)."""

    async def try_reserve(
        self, reservation_id: str, amounts: Mapping[Entry, int]
    ) -> StoreRefusal | None: ...

    async def settle(
        self, reservation_id: str, actual: Mapping[Entry, int]
    ) -> dict[Entry, int] | None: ...

    async def release(self, reservation_id: str) -> bool: ...

    async def counters(self, entries: Iterable[Entry]) -> dict[Entry, CounterView]: ...


class AsyncStoreAdapter:
    """A ``BudgetStore`` behind awaitable calls, each preceded by ``hop()`` (a network
    hop; ``asyncio.sleep(0)`` by default), so tests see the interleavings a remote store
    allows. Each call itself stays atomic, as it is on an actor."""

    def __init__(
        self, store: BudgetStore, hop: Callable[[], Awaitable[None]] = lambda: asyncio.sleep(0)
    ):
        self.store = store
        self._hop = hop

    async def try_reserve(
        self, reservation_id: str, amounts: Mapping[Entry, int]
    ) -> StoreRefusal | None:
        await self._hop()
        return self.store.try_reserve(reservation_id, amounts)

    async def settle(
        self, reservation_id: str, actual: Mapping[Entry, int]
    ) -> dict[Entry, int] | None:
        await self._hop()
        return self.store.settle(reservation_id, actual)

    async def release(self, reservation_id: str) -> bool:
        await self._hop()
        return self.store.release(reservation_id)

    async def counters(self, entries: Iterable[Entry]) -> dict[Entry, CounterView]:
        await self._hop()
        return self.store.counters(entries)


# --- decisions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one task; pass it to ``settle`` or ``release`` exactly once."""

    id: str
    agent_id: str
    pool: str
    priority_class: str
    tenant: str | None
    estimate: Usage
    at_s: float
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """No budget for the task. ``retry_elsewhere``: only this agent's own budget was
    short, so another agent may take the task; otherwise no agent may (fail it with
    ``reason`` or hold it until ``retry_after_s``, when the refusing window ends)."""

    reason: str
    agent_id: str
    key: str
    scope: str
    detail: str
    retry_elsewhere: bool
    retry_after_s: float


@dataclass(frozen=True, slots=True)
class Settlement:
    actual: Usage
    refunded_usd: float  # reserved but not used, back in the budgets
    overrun_usd: float  # used beyond the reservation (should be 0: cap the task)
    duplicate: bool = False  # the reservation was already settled or released


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    """Usage of a budget passed ``threshold`` of its limit (once per window). Alerts
    are remembered (and logged) until a day starts after their window has ended
    before yesterday (``alert_kept``)."""

    at_s: float
    key: str
    window_index: int
    threshold: float
    used: float
    limit: float

    @property
    def message(self) -> str:
        return (
            f"{self.key}: used {self.used:g} of {self.limit:g} "
            f"({self.used / self.limit:.0%} >= {self.threshold:.0%})"
            if self.limit
            else f"{self.key}: limit is 0"
        )


StatsRow = tuple[float, int, float, int]
"""A scope's spend today: (USD, tokens, CPU seconds, tasks)."""


@dataclass(slots=True)
class PolicyState:
    """What a ``BudgetPolicy`` holds besides its store's counters that a restart must
    recover, as plain data for a storage layer (``fleet.runtime.budget_store``).

    ``restore`` takes all of it; ``take_changes`` returns the scalars and only what
    changed since its last call: the ``stats`` rows of scopes that spent, the alerts
    raised, and ``new_day`` when a day started in between (before these changes, all
    stats were cleared and the alerts of windows that ended before yesterday dropped,
    see ``alert_kept``). Not kept: membership (agents join again as they reserve),
    burn-rate and demand history (they restart empty), the allocation (recomputed).
    """

    day: int | None = None
    seq: int = 0  # reservation ids continue after it, so none is ever reused
    reserved_count: int = 0
    settled_count: int = 0
    overrun_usd: float = 0.0
    refusals: dict[str, int] = field(default_factory=dict)
    stats: dict[str, StatsRow] = field(default_factory=dict)
    alerts: list[tuple[BudgetAlert, bool]] = field(default_factory=list)  # (alert, polled)
    new_day: bool = False


def alert_kept(key: str, index: int, day: int) -> bool:
    """Whether a new ``day`` still remembers an alert of window ``index`` of ``key``
    (so it does not fire again): while the window ends after yesterday began."""
    return window_end_s(key, index) > (day - 1) * DAY_S


@dataclass(slots=True)
class _Changes:
    stats: set[str] = field(default_factory=set)
    alerts: list[BudgetAlert] = field(default_factory=list)
    new_day: bool = False


@dataclass(slots=True)
class _Member:
    agent_id: str
    pool: str
    cls: str
    rank: int  # higher is more important
    weight: float
    size: float
    joined_s: float
    demand: TimeBuckets  # USD settled, USD refused by the agent's own budget
    alloc_key: str  # its daily USD allocation
    keys: tuple[str, ...]  # all its own budget keys


@dataclass(slots=True)
class _Stats:
    """Per-day spend (USD) and burn of one scope, for status and metrics."""

    since_s: float
    burn: TimeBuckets
    spend_usd: float = 0.0
    tokens: int = 0
    cpu_s: float = 0.0
    tasks: int = 0


@dataclass(slots=True)
class _ClassView:
    agents: int = 0
    allocated_usd: float = 0.0
    short: int = 0  # allocated less than their demand (or max)
    preempted: int = 0  # short, and cut to their minimum (or to what they used)
    below_min: int = 0  # allocated less than their minimum (the total did not allow it)


class BudgetPolicy:
    """Budgets of one fleet: membership, allocation, reservation, settlement, alerts.

    Runtime API: ``join``/``leave`` agents as they start and stop; before each task
    ``reserve(agent_id, estimate, tenant=...)`` -> ``Reservation | Refusal``; after it
    ``settle(reservation, actual)`` (or ``release(reservation)`` if it never ran, e.g.
    preempted back to the queue). ``rebalance`` runs by itself when due (on the next
    ``reserve``) and may also be called by a control loop; ``poll_alerts`` returns new
    alerts; ``snapshot`` feeds ``fleet status`` and metrics.
    """

    def __init__(
        self,
        spec: BudgetsSpec,
        clock: Clock,
        store: BudgetStore | None = None,
        max_agents_by_pool: Mapping[str, int] | None = None,
        alert_log_size: int = DEFAULT_ALERT_LOG_SIZE,
    ):
        self.spec = spec
        self.store: BudgetStore = store if store is not None else InMemoryBudgetStore()
        self._clock = clock
        self._max_agents = dict(max_agents_by_pool or {})
        self._policy = Policy(spec.allocation)
        self._preemption = Preemption(spec.preemption)
        names = spec.class_names
        self._rank = {n: len(names) - i for i, n in enumerate(names)}
        self._class_weight = {c.name: c.weight for c in spec.priority_classes}
        self._members: dict[str, _Member] = {}
        self._departed: dict[str, int] = {}  # agent id -> day index it left in
        self._seq = 0
        self._dirty = True
        self._next_rebalance_s = -math.inf
        self._day: int | None = None
        self.allocation: Allocation | None = None
        self._class_view: dict[str, _ClassView] = {}
        self._stats: dict[str, _Stats] = {}
        self._alerted: set[tuple[str, int, float]] = set()
        self._new_alerts: list[BudgetAlert] = []
        self.alerts: deque[BudgetAlert] = deque(maxlen=alert_log_size)
        self.refusals: dict[str, int] = {}
        self.overrun_usd = 0.0
        self.reserved_count = 0
        self.settled_count = 0
        self._key_info: dict[str, tuple[Resource, str]] = {}
        self._scope_key_cache: dict[tuple[str, str], list[str]] = {}
        self._changes: _Changes | None = None  # noted for take_changes once asked
        static = self._static_limits()
        self._fleet_keys = [k for k in static if k.startswith("fleet:")]
        self.store.set_limits(static)

    @classmethod
    def for_fleet(
        cls, fleet_spec: FleetSpec, clock: Clock, store: BudgetStore | None = None
    ) -> BudgetPolicy:
        """Build from a ``FleetSpec`` (its ``budgets`` and its pools' ``max_agents``)."""
        pools = fleet_spec.pools
        return cls(
            fleet_spec.budgets,
            clock,
            store,
            {p.name: p.autoscaling.max_agents for p in pools},
        )

    # -- limits ----------------------------------------------------------------------------
    def _static_limits(self) -> dict[str, int | None]:
        s = self.spec
        out: dict[str, int | None] = {}
        if s.daily_usd is not None:
            out[budget_key("fleet", FLEET, Resource.USD, "daily")] = limit_units(
                Resource.USD, s.daily_usd
            )
        if s.hourly_usd is not None:
            out[budget_key("fleet", FLEET, Resource.USD, "hourly")] = limit_units(
                Resource.USD, s.hourly_usd
            )
        for scope, table in (("pool", s.pools), ("tenant", s.tenants)):
            for name, limits in table.items():
                for (res, win), value in limits.limits().items():
                    r = Resource(res)
                    out[budget_key(scope, name, r, win)] = limit_units(r, value)
        return out

    def _agent_static_limits(self, agent_id: str) -> dict[str, int]:
        s = self.spec
        limits = {(Resource(r), w): v for (r, w), v in s.per_agent.limits().items()}
        if s.daily_usd is None and s.per_agent_max_usd is not None:
            key = (Resource.USD, "daily")
            limits[key] = min(limits.get(key, math.inf), s.per_agent_max_usd)
        return {
            budget_key("agent", agent_id, r, w): limit_units(r, v)
            for (r, w), v in limits.items()
        }

    def _allocated_key(self, agent_id: str) -> str:
        return budget_key("agent", agent_id, Resource.USD, "daily")

    # -- membership ------------------------------------------------------------------------
    def join(
        self,
        agent_id: str,
        pool: str,
        *,
        priority_class: str | None = None,
        weight: float = 1.0,
        size: float = 1.0,
    ) -> None:
        """An agent started; its class defaults to its pool's (``pool_classes``).
        ``weight`` multiplies its class weight, ``size`` is its size for the ``resource``
        policy. Joining again resets its burn-rate history, not what it used today."""
        cls = priority_class or self.spec.class_of_pool(pool)
        if cls not in self._rank:
            raise ValueError(
                f"agent {agent_id}: unknown priority class {cls!r} "
                f"(classes: {', '.join(self.spec.class_names)})"
            )
        now = self._clock()
        window = self.spec.burn_rate_window_s
        limits: dict[str, int | None] = dict(self._agent_static_limits(agent_id))
        alloc_key = self._allocated_key(agent_id)
        if self.spec.daily_usd is not None:
            limits[alloc_key] = 0  # until the next rebalance
        self._members[agent_id] = _Member(
            agent_id,
            pool,
            cls,
            self._rank[cls],
            weight,
            size,
            now,
            TimeBuckets(window, 2),
            alloc_key,
            tuple(limits),
        )
        self._departed.pop(agent_id, None)
        self.store.set_limits(limits)
        self._dirty = True

    def leave(self, agent_id: str) -> None:
        """An agent stopped; what it spent today still counts against the fleet."""
        m = self._members.pop(agent_id, None)
        if m is None:
            return
        for key in m.keys:
            self._key_info.pop(key, None)
        self._departed[agent_id] = window_index("daily", self._clock())
        if self.spec.daily_usd is not None:
            self.store.set_limits({self._allocated_key(agent_id): 0})
        self._dirty = True

    @property
    def agents(self) -> int:
        return len(self._members)

    # -- the hot path ---------------------------------------------------------------------
    def reserve(
        self, agent_id: str, estimate: Usage, *, tenant: str | None = None
    ) -> Reservation | Refusal:
        """Hold ``estimate`` (the task's maximum cost) on every budget the task falls
        under, or refuse with ``budget_exhausted``."""
        m = self._members.get(agent_id)
        if m is None:
            raise KeyError(f"agent {agent_id} has not joined the budget (call join first)")
        now = self._clock()
        self._maybe_rebalance(now)
        amounts = self._amounts(m, tenant, estimate, now)
        self._seq += 1
        rid = f"{agent_id}#{self._seq}"
        refused = self.store.try_reserve(rid, amounts)
        if refused is not None and self._may_claim_more(m, refused, estimate):
            # The agent wants more than its share while part of the budget is unallocated
            # (dynamic allocation keeps what nobody claims free): count the unmet demand,
            # reallocate and try once more, instead of refusing a task the budget covers.
            m.demand.add(now, 0.0, estimate.usd)
            self.rebalance()
            refused = self.store.try_reserve(rid, amounts)
            if refused is not None:
                return self._refusal(m, estimate, refused, now, count_unmet=False)
        elif refused is not None:
            return self._refusal(m, estimate, refused, now)
        self.reserved_count += 1
        return Reservation(rid, agent_id, m.pool, m.cls, tenant, estimate, now, tuple(amounts))

    def _amounts(
        self, m: _Member, tenant: str | None, est: Usage, now: float
    ) -> dict[Entry, int]:
        keys = [*self._fleet_keys, *m.keys, *self._scope_keys("pool", m.pool, self.spec.pools)]
        if tenant is not None:
            keys.extend(self._scope_keys("tenant", tenant, self.spec.tenants))
        out: dict[Entry, int] = {}
        for key in keys:
            info = self._key_info.get(key)
            if info is None:
                info = self._key_info[key] = parse_key(key)[2:]
            resource, window = info
            out[(key, math.floor(now / WINDOW_S[window]))] = to_units(
                resource, est.amount(resource)
            )
        return out

    def _scope_keys(
        self, scope: str, name: str, table: Mapping[str, ScopeLimits]
    ) -> list[str]:
        keys = self._scope_key_cache.get((scope, name))
        if keys is None:
            limits = table.get(name)
            keys = (
                [budget_key(scope, name, r, w) for r, w in limits.limits()]
                if limits is not None
                else []
            )
            self._scope_key_cache[(scope, name)] = keys
        return keys

    def _may_claim_more(self, m: _Member, r: StoreRefusal, est: Usage) -> bool:
        a = self.allocation
        return (
            r.entry[0] == m.alloc_key
            and a is not None
            and a.unallocated >= est.usd
            and not self._dirty
        )

    def _refusal(
        self, m: _Member, est: Usage, r: StoreRefusal, now: float, count_unmet: bool = True
    ) -> Refusal:
        key, index = r.entry
        scope, _, resource, window = parse_key(key)
        self.refusals[scope] = self.refusals.get(scope, 0) + 1
        own = scope == "agent"
        if own and resource is Resource.USD and count_unmet:
            m.demand.add(now, 0.0, est.usd)

        def fmt(units: int) -> str:
            return f"{from_units(resource, units):g}"

        detail = (
            f"{key}: used {fmt(r.used)} + reserved {fmt(r.reserved)} + this task "
            f"{fmt(r.asked)} > limit {fmt(r.limit)}"
        )
        ends = (index + 1) * WINDOW_S[window]
        return Refusal(
            REASON_EXHAUSTED, m.agent_id, key, scope, detail, own, max(0.0, ends - now)
        )

    def settle(self, reservation: Reservation, actual: Usage) -> Settlement:
        """Replace the reservation by what the task actually used."""
        amounts = {}
        for entry in reservation.entries:
            resource = parse_key(entry[0])[2]
            amounts[entry] = to_units(resource, actual.amount(resource))
        overruns = self.store.settle(reservation.id, amounts)
        if overruns is None:
            return Settlement(actual, 0.0, 0.0, duplicate=True)
        now = self._clock()
        self.settled_count += 1
        overrun_usd = max(
            (
                from_units(Resource.USD, u)
                for (k, _), u in overruns.items()
                if parse_key(k)[2] is Resource.USD
            ),
            default=0.0,
        )
        self.overrun_usd += overrun_usd
        self._count(reservation, actual, now)
        self._check_alerts(reservation.entries, now)
        return Settlement(actual, max(0.0, reservation.estimate.usd - actual.usd), overrun_usd)

    def release(self, reservation: Reservation) -> bool:
        """Give the whole reservation back (the task did not run)."""
        return self.store.release(reservation.id)

    # -- allocation ------------------------------------------------------------------------
    def _maybe_rebalance(self, now: float) -> None:
        if (
            self._dirty
            or now >= self._next_rebalance_s
            or window_index("daily", now) != self._day
        ):
            self.rebalance()

    def rebalance(self) -> Allocation | None:
        """Recompute every agent's share of the daily USD budget and set their limits."""
        now = self._clock()
        day = window_index("daily", now)
        if day != self._day:
            self._new_day(day)
        self._dirty = False
        self._next_rebalance_s = now + self.spec.rebalance_interval_s
        s = self.spec
        if s.daily_usd is None:
            return None
        members = list(self._members.values())
        entries = [(m.alloc_key, day) for m in members]
        gone = [(self._allocated_key(a), day) for a, d in self._departed.items() if d == day]
        views = self.store.counters(entries + gone)
        gone_used = math.fsum(
            from_units(Resource.USD, views[e].used + views[e].reserved) for e in gone
        )
        cap = s.per_agent_max_usd if s.per_agent_max_usd is not None else s.daily_usd
        remaining_s = (day + 1) * DAY_S - now
        claims = []
        for m, e in zip(members, entries):
            used = from_units(Resource.USD, views[e].used + views[e].reserved)
            claims.append(
                Claim(
                    m.agent_id,
                    min=min(s.per_agent_min_usd, cap),
                    max=cap,
                    weight=self._class_weight[m.cls] * m.weight,
                    size=m.size,
                    demand=self._demand(m, used, now, remaining_s),
                    priority=m.rank,
                    used=used,
                )
            )
        claims.extend(self._growth_reserve())
        total = max(s.daily_usd - gone_used, math.fsum(c.used for c in claims))
        alloc = allocate(total, claims, self._policy, self._preemption)
        self.allocation = alloc
        shares = alloc.shares
        self.store.set_limits(
            {m.alloc_key: limit_units(Resource.USD, shares[m.agent_id]) for m in members}
        )
        view: dict[str, _ClassView] = {c: _ClassView() for c in s.class_names}
        for m, c in zip(members, claims):
            v = view[m.cls]
            x = shares[m.agent_id]
            v.agents += 1
            v.allocated_usd += x
            if m.agent_id in alloc.below_cap:
                v.short += 1
                # Preempted: it wants more, yet gets nothing beyond its minimum (or what it
                # already used) because the surplus went to higher classes or ran out.
                v.preempted += x <= max(c.min, c.used) + 1e-9 * max(1.0, x)
            v.below_min += m.agent_id in alloc.below_min
        self._class_view = view
        return alloc

    def _demand(self, m: _Member, used: float, now: float, remaining_s: float) -> float | None:
        """Projected USD the agent would use today: used so far plus its burn (and the
        budget it was refused) projected to the end of the day; None (as much as its
        maximum) while it is too new to tell."""
        age = now - m.joined_s
        if age < self.spec.rebalance_interval_s:
            return None
        span = min(age, self.spec.burn_rate_window_s)
        spent, refused = m.demand.sums(now)
        rate = (spent + refused) / span
        return used + rate * remaining_s * self.spec.demand_headroom

    def _growth_reserve(self) -> list[Claim]:
        """One claim per class with ``reserve_for_growth``: the minimum of every agent
        its pools may still start, at the class's priority, never more."""
        lo = self.spec.per_agent_min_usd
        out = []
        for c in self.spec.priority_classes:
            if not c.reserve_for_growth or lo == 0:
                continue
            pools = [p for p in self._max_agents if self.spec.class_of_pool(p) == c.name]
            present = sum(1 for m in self._members.values() if m.pool in pools)
            absent = max(0, sum(self._max_agents[p] for p in pools) - present)
            if absent:
                out.append(
                    Claim(
                        f"~growth:{c.name}",
                        min=absent * lo,
                        max=absent * lo,
                        priority=self._rank[c.name],
                    )
                )
        return out

    def _new_day(self, day: int) -> None:
        self._day = day
        self._departed = {a: d for a, d in self._departed.items() if d >= day}
        self._stats.clear()
        # By window end, not index: hourly indexes are 24 times larger than daily ones.
        # The alert log keeps the same alerts, so a restart finds the same log.
        self._alerted = {a for a in self._alerted if alert_kept(a[0], a[1], day)}
        kept = [a for a in self.alerts if alert_kept(a.key, a.window_index, day)]
        self.alerts.clear()
        self.alerts.extend(kept)
        self._new_alerts = [
            a for a in self._new_alerts if alert_kept(a.key, a.window_index, day)
        ]
        c = self._changes
        if c is not None:
            c.new_day = True
            c.stats.clear()
            c.alerts = [a for a in c.alerts if alert_kept(a.key, a.window_index, day)]
        self.store.expire(
            {"daily": day - 1, "hourly": window_index("hourly", day * DAY_S) - 1}
        )

    # -- monitoring --------------------------------------------------------------------------
    def _stat(self, name: str, now: float) -> _Stats:
        st = self._stats.get(name)
        if st is None:
            st = self._stats[name] = _Stats(now, TimeBuckets(self.spec.burn_rate_window_s, 1))
        return st

    def _count(self, r: Reservation, actual: Usage, now: float) -> None:
        names = ["fleet", f"agent:{r.agent_id}", f"pool:{r.pool}", f"class:{r.priority_class}"]
        if r.tenant is not None:
            names.append(f"tenant:{r.tenant}")
        for name in names:
            st = self._stat(name, now)
            st.spend_usd += actual.usd
            st.tokens += actual.tokens
            st.cpu_s += actual.cpu_s
            st.tasks += 1
            st.burn.add(now, actual.usd)
        m = self._members.get(r.agent_id)
        if m is not None:
            m.demand.add(now, actual.usd, 0.0)
        if self._changes is not None:
            self._changes.stats.update(names)

    def _check_alerts(self, entries: Iterable[Entry], now: float) -> None:
        views = self.store.counters(entries)
        for (key, index), v in views.items():
            if not v.limit:
                continue
            share = v.used / v.limit
            resource = parse_key(key)[2]
            for t in self.spec.alert_thresholds:
                if share >= t and (key, index, t) not in self._alerted:
                    self._alerted.add((key, index, t))
                    alert = BudgetAlert(
                        now,
                        key,
                        index,
                        t,
                        from_units(resource, v.used),
                        from_units(resource, v.limit),
                    )
                    self._new_alerts.append(alert)
                    self.alerts.append(alert)
                    if self._changes is not None:
                        self._changes.alerts.append(alert)

    # -- durability ------------------------------------------------------------------------
    def record_changes(self) -> None:
        """Start noting what ``take_changes`` reports (a durable runtime calls it once,
        after ``restore``); without it the policy notes nothing."""
        self._changes = _Changes()

    def take_changes(self) -> PolicyState:
        """The scalars, and the stats and alerts changed since the last call (see
        ``PolicyState``); alerts come unpolled."""
        c = self._changes
        if c is None:
            raise RuntimeError("call record_changes first")
        self._changes = _Changes()
        stats = {
            n: (st.spend_usd, st.tokens, st.cpu_s, st.tasks)
            for n in c.stats
            if (st := self._stats.get(n)) is not None
        }
        return PolicyState(
            self._day,
            self._seq,
            self.reserved_count,
            self.settled_count,
            self.overrun_usd,
            dict(self.refusals),
            stats,
            [(a, False) for a in c.alerts],
            c.new_day,
        )

    def restore(self, state: PolicyState, spent_today: Iterable[str] = ()) -> None:
        """Take back a state saved before a restart, on a new policy whose store
        already holds the saved counters. Agents join again as they reserve; until
        then the agents in ``spent_today`` (usage in today's window) count as departed,
        exactly as if they had left: what they spent stays out of the others' shares."""
        now = self._clock()
        self._day = state.day
        self._seq = state.seq
        self.reserved_count = state.reserved_count
        self.settled_count = state.settled_count
        self.overrun_usd = state.overrun_usd
        self.refusals = dict(state.refusals)
        window = self.spec.burn_rate_window_s
        # Burn history is not kept: a scope's burn rate counts again from now.
        self._stats = {
            n: _Stats(now, TimeBuckets(window, 1), *row) for n, row in state.stats.items()
        }
        self._alerted = {(a.key, a.window_index, a.threshold) for a, _ in state.alerts}
        self.alerts.clear()
        self.alerts.extend(a for a, _ in state.alerts)
        self._new_alerts = [a for a, polled in state.alerts if not polled]
        today = window_index("daily", now)
        for agent_id in spent_today:
            if agent_id not in self._members:
                self._departed[agent_id] = today
        self._dirty = True

    def poll_alerts(self) -> list[BudgetAlert]:
        """Alerts raised since the last call."""
        out, self._new_alerts = self._new_alerts, []
        return out

    def burn_rate_usd_per_h(self, name: str = "fleet") -> float:
        """USD per hour over the last ``burn_rate_window_s`` of ``fleet``, ``agent:ID``,
        ``pool:P``, ``tenant:T`` or ``class:C``."""
        st = self._stats.get(name)
        if st is None:
            return 0.0
        now = self._clock()
        # Over a scope's first window, divide by the time it has existed, not the window.
        span = max(
            min(self.spec.burn_rate_window_s, now - st.since_s),
            self.spec.burn_rate_window_s / st.burn.buckets,
        )
        return st.burn.sums(now)[0] * HOUR_S / span

    def spend_usd(self, name: str = "fleet") -> float:
        """USD settled today by ``fleet``, ``agent:ID``, ``pool:P``, ``tenant:T``,
        ``class:C``."""
        st = self._stats.get(name)
        return st.spend_usd if st else 0.0

    def counter(self, key: str) -> CounterView:
        """A budget's counter in the current window."""
        window = parse_key(key)[3]
        entry = (key, window_index(window, self._clock()))
        return self.store.counters([entry])[entry]

    def limit_usd(self, agent_id: str) -> float:
        v = self.counter(self._allocated_key(agent_id))
        return math.inf if v.limit is None else from_units(Resource.USD, v.limit)

    def remaining_usd(self, agent_id: str | None = None) -> float:
        """USD the agent (or, with None, the fleet) may still reserve today."""
        key = (
            self._allocated_key(agent_id)
            if agent_id is not None
            else budget_key("fleet", FLEET, Resource.USD, "daily")
        )
        avail = self.counter(key).available
        return math.inf if avail is None else from_units(Resource.USD, avail)

    def can_take_work(self, agent_id: str, estimate_usd: float = 0.0) -> bool:
        """Whether the agent's own budget still fits a task of ``estimate_usd`` (routers
        skip agents whose budget is exhausted)."""
        remaining = self.remaining_usd(agent_id)
        return remaining >= estimate_usd if estimate_usd > 0 else remaining > 0

    def class_of(self, agent_id: str) -> str:
        return self._members[agent_id].cls

    def classes(self) -> dict[str, dict[str, float]]:
        """Per priority class, as of the last rebalance: agents, USD allocated, USD
        spent today, and how many agents were short of their demand, preempted (cut to
        their minimum) or below their minimum."""
        return {
            c: {
                "agents": v.agents,
                "allocated_usd": v.allocated_usd,
                "spend_usd": self.spend_usd(f"class:{c}"),
                "short": v.short,
                "preempted": v.preempted,
                "below_min": v.below_min,
            }
            for c, v in self._class_view.items()
        }

    def snapshot(self, top_agents: int = 20) -> dict[str, object]:
        """Spend, limits, burn and preemption per fleet, class, pool, tenant and the
        top-spending agents, for ``fleet status`` and metrics."""
        now = self._clock()
        fleet_key = budget_key("fleet", FLEET, Resource.USD, "daily")
        fleet = self.counter(fleet_key) if self.spec.daily_usd is not None else None

        def scope(prefix: str) -> dict[str, dict[str, float]]:
            return {
                n.split(":", 1)[1]: {
                    "spend_usd": st.spend_usd,
                    "tokens": st.tokens,
                    "cpu_s": st.cpu_s,
                    "tasks": st.tasks,
                    "burn_usd_per_h": self.burn_rate_usd_per_h(n),
                }
                for n, st in self._stats.items()
                if n.startswith(prefix)
            }

        agents = scope("agent:")
        top = dict(sorted(agents.items(), key=lambda kv: -kv[1]["spend_usd"])[:top_agents])
        for a, row in top.items():
            if a in self._members and self.spec.daily_usd is not None:
                row["limit_usd"] = self.limit_usd(a)
        return {
            "day": window_index("daily", now),
            "day_ends_in_s": (window_index("daily", now) + 1) * DAY_S - now,
            "fleet": {
                "limit_usd": self.spec.daily_usd,
                "used_usd": from_units(Resource.USD, fleet.used)
                if fleet
                else self.spend_usd("fleet"),
                "reserved_usd": from_units(Resource.USD, fleet.reserved) if fleet else 0.0,
                "burn_usd_per_h": self.burn_rate_usd_per_h("fleet"),
                "agents": len(self._members),
            },
            "classes": self.classes(),
            "pools": scope("pool:"),
            "tenants": scope("tenant:"),
            "top_agents": top,
            "refusals": dict(self.refusals),
            "overrun_usd": self.overrun_usd,
            "alerts": [a.message for a in list(self.alerts)[-10:]],
        }
