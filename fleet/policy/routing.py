"""Routers: pick the candidate (agent or host) that gets the next piece of work.

Pure and transport-free: a router sees ``Candidate`` load snapshots, an optional
``RoutingHint`` describing the task, and an injected ``random.Random``. The Serve
request router, the tests (with fake candidates) and the simulator call the same
objects.

Two kinds of router:

- *balancers* pick among candidates by load alone: ``LeastLoadedRouter`` (power of d),
  ``FullScanRouter``, ``RoundRobinRouter``, ``RandomRouter``, ``CapacityRouter``;
- *task-aware* routers use the hint and delegate to a balancer: ``SpecializationRouter``
  (experts first), ``SuccessRateRouter`` (skip agents failing this task type) and
  ``AffinityRouter`` (same key, same agent, with bounded load). They compose, e.g.
  ``SuccessRateRouter(..., balancer=SpecializationRouter(...))``.

Feedback: the runtime reports every finished task with ``router.record_outcome(agent_id,
ok, task_type)`` and a departed agent with ``router.forget(agent_id)``; routers that do
not learn ignore both.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleet.policy.breaker import DEFAULT_TIME_BUCKETS, TimeBuckets
from fleet.policy.hashing import stable_hash64
from fleet.spec.routing import (
    BalancerName,
    RouterName,
    RoutingSpec,
    SpecializationFallback,
    SuccessRateFallback,
    SuccessRateSpec,
)

Clock = Callable[[], float]

_MASK64 = (1 << 64) - 1
_AGENT_HASH_CACHE_MAX = 100_000


@dataclass(slots=True)
class Candidate:
    """A load snapshot. ``capacity`` is how many tasks it may hold at once.

    Optional fields, for the routers that use them: ``weight`` is the relative speed of
    one slot (capacity router, affinity shares; 1 when all agents are alike);
    ``expertise`` the task types it specializes in (specialization router);
    ``success_rate`` and ``calls`` its measured success share for the task's type and
    the calls behind it, when the runtime measures them itself (success-rate router;
    None means "ask the router's own tracker").
    """

    id: str
    in_flight: int
    capacity: int
    latency_s: float = 0.0
    weight: float = 1.0
    expertise: frozenset[str] = field(default_factory=frozenset)
    success_rate: float | None = None
    calls: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight

    @property
    def load(self) -> float:
        return self.in_flight / self.capacity if self.capacity > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class RoutingHint:
    """What a router may know about the task: its type (for specialization and success
    rates; the capability, or a finer type inside it) and its affinity key."""

    task_type: str | None = None
    affinity_key: str | None = None


class Router(Protocol):
    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        """Index of the chosen candidate, or None when no candidate may take the task."""

    def record_outcome(self, agent_id: str, ok: bool, task_type: str | None = None) -> None:
        """A task routed to ``agent_id`` finished (``ok``: succeeded)."""

    def forget(self, agent_id: str) -> None:
        """``agent_id`` left the pool; drop what is known about it."""


class _BaseRouter:
    """No-op feedback hooks for routers that do not learn from outcomes."""

    def record_outcome(self, agent_id: str, ok: bool, task_type: str | None = None) -> None:
        return None

    def forget(self, agent_id: str) -> None:
        return None


def _key(c: Candidate) -> tuple[float, float]:
    # Lowest relative load first; on a tie, the one that has been answering faster.
    return (c.load, c.latency_s)


def _choose_among(
    router: Router,
    candidates: Sequence[Candidate],
    keep: list[int],
    rng: random.Random,
    task: RoutingHint | None,
) -> int | None:
    """Let ``router`` choose among ``candidates[keep]``; map the answer back."""
    if not keep:
        return None
    if len(keep) == len(candidates):
        return router.choose(candidates, rng, task)
    j = router.choose([candidates[i] for i in keep], rng, task)
    return None if j is None else keep[j]


# --- balancers -----------------------------------------------------------------------


class FullScanRouter(_BaseRouter):
    """Least loaded over every candidate: exact, O(n)."""

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        best, best_key = None, None
        for i, c in enumerate(candidates):
            if c.free <= 0:
                continue
            k = _key(c)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best


class LeastLoadedRouter(_BaseRouter):
    """Power of d choices: sample d candidates, take the least loaded.

    Sampling d >= 2 instead of scanning keeps the choice O(d) while, by the
    supermarket-model result, the maximum queue length falls from log n / log log n
    (random) to log log n / log d. If every sampled candidate is full we fall back to
    a full scan, so a free candidate is never missed.
    """

    def __init__(self, d: int = 2):
        if d < 1:
            raise ValueError(f"choices_d must be >= 1, got {d}")
        self.d = d
        self._scan = FullScanRouter()

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        n = len(candidates)
        if n == 0:
            return None
        if n > 2 and self.d == 2:
            # The common case, without rng.sample's set-up: two distinct indices, the
            # second drawn from the n - 1 others. Same choice rule as below. (An index
            # from one random() is uniform to within n / 2**53, and costs a sixth of
            # randrange: this runs for every task, twice in the simulator.)
            rnd = rng.random
            i = int(rnd() * n)
            j = int(rnd() * (n - 1))
            if j >= i:
                j += 1
            a, b = candidates[i], candidates[j]
            a_ok, b_ok = a.in_flight < a.capacity, b.in_flight < b.capacity
            if a_ok and b_ok:
                la, lb = a.in_flight / a.capacity, b.in_flight / b.capacity
                if lb < la or (lb == la and b.latency_s < a.latency_s):
                    return j
                return i
            if a_ok:
                return i
            if b_ok:
                return j
            return self._scan.choose(candidates, rng)
        picks = range(n) if n <= self.d else rng.sample(range(n), self.d)
        best, best_key = None, None
        for i in picks:
            c = candidates[i]
            if c.free <= 0:
                continue
            k = _key(c)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best if best is not None else self._scan.choose(candidates, rng)


class RoundRobinRouter(_BaseRouter):
    """Next candidate in turn, skipping full ones."""

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        n = len(candidates)
        for k in range(n):
            i = (self._next + k) % n
            if candidates[i].free > 0:
                self._next = i + 1
                return i
        return None


class RandomRouter(_BaseRouter):
    """Uniformly random among candidates with room."""

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        free = [i for i, c in enumerate(candidates) if c.free > 0]
        return rng.choice(free) if free else None


class CapacityRouter(_BaseRouter):
    """Random, with probability proportional to ``weight`` x free slots.

    For pools of unequal agents: ``capacity`` carries an agent's size (slots) and
    ``weight`` the speed of one slot, so a large, fast, idle agent gets the most work
    and a full one none. Random rather than greedy so that several dispatchers acting
    on the same (slightly stale) snapshot do not all pile onto the same agent.
    """

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        weights = [
            c.weight * c.free if c.free > 0 and c.weight > 0 else 0.0 for c in candidates
        ]
        total = math.fsum(weights)
        if total <= 0:  # free agents of weight 0 still beat leaving the task queued
            return FullScanRouter().choose(candidates, rng)
        r = rng.random() * total
        acc = 0.0
        last = None
        for i, w in enumerate(weights):
            if w <= 0:
                continue
            acc += w
            last = i
            if r < acc:
                return i
        return last  # r landed on the float rounding at the very top


# --- task-aware routers --------------------------------------------------------------


class SpecializationRouter(_BaseRouter):
    """Tasks of a type go to free agents with that expertise, picked by ``balancer``.

    When no expert is free, ``fallback`` decides: ``generalists_first`` tries agents
    without any expertise (keeping other specialists free for their own work), then any
    free agent; ``any`` takes any free agent; ``wait`` returns None, so the task stays
    queued until an expert frees up. Tasks without a type go to any free agent.
    """

    def __init__(
        self,
        balancer: Router | None = None,
        fallback: SpecializationFallback = SpecializationFallback.GENERALISTS_FIRST,
    ):
        self.balancer = balancer or LeastLoadedRouter()
        self.fallback = SpecializationFallback(fallback)
        self.fallbacks = 0  # tasks that went to a non-expert

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        kind = task.task_type if task is not None else None
        free = [i for i, c in enumerate(candidates) if c.free > 0]
        if kind is None:
            return _choose_among(self.balancer, candidates, free, rng, task)
        experts = [i for i in free if kind in candidates[i].expertise]
        if experts:
            return _choose_among(self.balancer, candidates, experts, rng, task)
        if self.fallback is SpecializationFallback.WAIT or not free:
            return None
        pool = free
        if self.fallback is SpecializationFallback.GENERALISTS_FIRST:
            pool = [i for i in free if not candidates[i].expertise] or free
        self.fallbacks += 1
        return _choose_among(self.balancer, candidates, pool, rng, task)

    def record_outcome(self, agent_id: str, ok: bool, task_type: str | None = None) -> None:
        self.balancer.record_outcome(agent_id, ok, task_type)

    def forget(self, agent_id: str) -> None:
        self.balancer.forget(agent_id)


class SuccessRateTracker:
    """Per (agent, task type) successes over a sliding time window.

    Feed it every finished task (``record``); read ``stats``. Memory is one small
    bucket ring per (agent, type) seen in the window; entries whose window empties and
    departed agents (``forget``) are dropped. ``clock`` returns monotonic seconds.
    """

    def __init__(self, window_s: float, clock: Clock, buckets: int = DEFAULT_TIME_BUCKETS):
        self.window_s = window_s
        self._clock = clock
        self._buckets = buckets
        self._by: dict[tuple[str, str | None], TimeBuckets] = {}

    def record(self, agent_id: str, ok: bool, task_type: str | None = None) -> None:
        key = (agent_id, task_type)
        b = self._by.get(key)
        if b is None:
            b = self._by[key] = TimeBuckets(self.window_s, 2, self._buckets)
        b.add(self._clock(), 1, 1 if ok else 0)

    def stats(self, agent_id: str, task_type: str | None = None) -> tuple[int, float]:
        """(calls, success rate) of ``agent_id`` on ``task_type`` in the window; a rate
        of 1.0 when there were no calls."""
        key = (agent_id, task_type)
        b = self._by.get(key)
        if b is None:
            return 0, 1.0
        calls, ok = b.sums(self._clock())
        if calls <= 0:
            del self._by[key]
            return 0, 1.0
        return round(calls), ok / calls

    def forget(self, agent_id: str) -> None:
        for key in [k for k in self._by if k[0] == agent_id]:
            del self._by[key]


class SuccessRateRouter(_BaseRouter):
    """Skip agents whose recent success rate on the task's type is below the threshold.

    An agent counts as good while it has fewer than ``min_calls`` calls of that type in
    the window, so an excluded agent gets traffic again once its failures age out of the
    window (re-admission needs no timer). Rates come from the candidate itself when it
    carries ``success_rate``, else from ``tracker``, which ``record_outcome`` feeds. When
    no free agent qualifies, ``fallback`` picks: ``all`` free agents (spreading the load,
    like a breaker's panic mode) or the ``best`` ones (highest rate).
    """

    def __init__(
        self,
        spec: SuccessRateSpec,
        clock: Clock,
        balancer: Router | None = None,
        tracker: SuccessRateTracker | None = None,
    ):
        self.spec = spec
        self.balancer = balancer or LeastLoadedRouter()
        self.tracker = tracker or SuccessRateTracker(spec.window_s, clock)
        self.fallbacks = 0  # decisions where no agent qualified

    def _stats(self, c: Candidate, task_type: str | None) -> tuple[int, float]:
        if c.success_rate is not None:
            return c.calls, c.success_rate
        return self.tracker.stats(c.id, task_type)

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        kind = task.task_type if task is not None else None
        free: list[tuple[int, float]] = []
        good: list[int] = []
        for i, c in enumerate(candidates):
            if c.free <= 0:
                continue
            calls, rate = self._stats(c, kind)
            free.append((i, rate))
            if calls < self.spec.min_calls or rate >= self.spec.min_success_rate:
                good.append(i)
        if good or not free:
            return _choose_among(self.balancer, candidates, good, rng, task)
        self.fallbacks += 1
        if self.spec.fallback is SuccessRateFallback.BEST:
            top = max(rate for _, rate in free)
            keep = [i for i, rate in free if rate >= top]
        else:
            keep = [i for i, _ in free]
        return _choose_among(self.balancer, candidates, keep, rng, task)

    def record_outcome(self, agent_id: str, ok: bool, task_type: str | None = None) -> None:
        self.tracker.record(agent_id, ok, task_type)
        self.balancer.record_outcome(agent_id, ok, task_type)

    def forget(self, agent_id: str) -> None:
        self.tracker.forget(agent_id)
        self.balancer.forget(agent_id)


# splitmix64 finalizer constants: mixing (key hash XOR agent hash) gives an
# independent-looking 64-bit value per (key, agent), far cheaper than hashing the
# concatenated strings for every candidate.
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INV_2_64 = 2.0**-64


class AffinityRouter(_BaseRouter):
    """Same affinity key, same agent: weighted rendezvous hashing with bounded load.

    Each key ranks the candidates by ``weight / -ln(u)`` with ``u`` a hash of (key,
    agent) in (0, 1) (weighted rendezvous / highest random weight), and goes to the
    first candidate in that ranking that has a free slot and whose in-flight count stays
    within ``ceil(load_factor * (m + 1) * weight / W)``, where ``m`` is the in-flight
    total and ``W`` the total weight (its fair share of the load after this task,
    stretched by ``load_factor``).

    Why this is correct and stable:
    - some candidate is always within its bound when ``load_factor >= 1``: if every
      candidate had ``in_flight_i >= bound_i`` then ``m >= sum(bound_i) >= load_factor *
      (m + 1) > m``. So no agent ever goes above ``ceil(load_factor * mean)``.
    - an agent joining takes exactly the keys that rank it first (about 1/(n+1) of
      them) and an agent leaving gives up only its own keys: the ranking of the other
      agents for a key does not depend on who else is there. Only keys pushed past a
      full agent by the load bound can move further.

    Tasks without a key go to ``balancer``. Cost: O(n) hash mixes per decision.
    """

    def __init__(self, load_factor: float = 1.25, balancer: Router | None = None):
        if not load_factor >= 1:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        self.load_factor = load_factor
        self.balancer = balancer or LeastLoadedRouter()
        self.overflows = 0  # keys sent past their first-ranked agent by the bound
        self._agent_hash: dict[str, int] = {}

    def _agent_h(self, agent_id: str) -> int:
        h = self._agent_hash.get(agent_id)
        if h is None:
            if len(self._agent_hash) >= _AGENT_HASH_CACHE_MAX:
                self._agent_hash.clear()
            h = self._agent_hash[agent_id] = stable_hash64(agent_id)
        return h

    def scores(self, key: str, candidates: Sequence[Candidate]) -> list[float]:
        """Each candidate's rendezvous score for ``key`` (higher ranks first)."""
        kh = stable_hash64(key)
        agent_h, log, mask = self._agent_h, math.log, _MASK64
        out = []
        for c in candidates:
            w = c.weight
            if w <= 0:
                out.append(-math.inf)
                continue
            x = kh ^ agent_h(c.id)
            x = ((x ^ (x >> 30)) * _MIX1) & mask
            x = ((x ^ (x >> 27)) * _MIX2) & mask
            x ^= x >> 31
            out.append(w / -log((x + 0.5) * _INV_2_64))  # u = (x + 0.5) / 2^64 in (0, 1)
        return out

    def bound(self, c: Candidate, total_in_flight: int, total_weight: float) -> int:
        """The most tasks ``c`` may hold after taking the next one."""
        share = self.load_factor * (total_in_flight + 1) * c.weight / total_weight
        return math.ceil(share - 1e-9)  # 1.25 * 10_000 / 50 must be 250, not 251

    def choose(
        self,
        candidates: Sequence[Candidate],
        rng: random.Random,
        task: RoutingHint | None = None,
    ) -> int | None:
        key = task.affinity_key if task is not None else None
        if key is None:
            return self.balancer.choose(candidates, rng, task)
        scores = self.scores(key, candidates)
        total_in_flight, total_weight = 0, 0.0
        for c in candidates:
            total_in_flight += max(c.in_flight, 0)
            total_weight += max(c.weight, 0.0)
        if total_weight <= 0:
            return self.balancer.choose(candidates, rng, task)

        def fits(i: int) -> bool:
            c = candidates[i]
            return c.free > 0 and c.in_flight + 1 <= self.bound(
                c, total_in_flight, total_weight
            )

        first = max(range(len(candidates)), key=scores.__getitem__, default=None)
        if first is None:
            return None
        if fits(first):
            return first
        self.overflows += 1
        for i in sorted(range(len(candidates)), key=scores.__getitem__, reverse=True):
            if scores[i] > -math.inf and fits(i):
                return i
        # Only full candidates are within their bound: any free one beats waiting.
        return FullScanRouter().choose(candidates, rng)

    def owner(self, key: str, candidates: Sequence[Candidate]) -> int | None:
        """The key's first-ranked candidate, ignoring load (for tests and status)."""
        scores = self.scores(key, candidates)
        return max(range(len(candidates)), key=scores.__getitem__, default=None)

    def record_outcome(self, agent_id: str, ok: bool, task_type: str | None = None) -> None:
        self.balancer.record_outcome(agent_id, ok, task_type)

    def forget(self, agent_id: str) -> None:
        self._agent_hash.pop(agent_id, None)
        self.balancer.forget(agent_id)


# --- from the spec -------------------------------------------------------------------

_BALANCER_NAMES = frozenset(b.value for b in BalancerName)


def make_balancer(name: BalancerName | RouterName | str, choices_d: int = 2) -> Router:
    """A load-only router by name."""
    name = BalancerName(getattr(name, "value", name))
    if name is BalancerName.LEAST_LOADED:
        return LeastLoadedRouter(choices_d)
    if name is BalancerName.FULL_SCAN:
        return FullScanRouter()
    if name is BalancerName.ROUND_ROBIN:
        return RoundRobinRouter()
    if name is BalancerName.RANDOM:
        return RandomRouter()
    return CapacityRouter()


def host_router(spec: RoutingSpec) -> Router:
    """The router that picks a host for a batch (Serve's request router live, the
    simulator's dispatcher): the spec's router if it balances by load alone, else the
    balancer the spec's task-aware router delegates to. A batch carries tasks of many
    types and keys, so the task-aware choice is made per task inside the host."""
    name = spec.router.value if spec.router.value in _BALANCER_NAMES else spec.balancer.value
    return make_balancer(name, spec.choices_d)


def make_router(
    spec: RoutingSpec,
    *,
    clock: Clock,
    tracker: SuccessRateTracker | None = None,
) -> Router:
    """The router a pool's spec names.

    ``clock`` (monotonic seconds: ``time.monotonic`` live, virtual time in tests and the
    simulator) drives the success-rate window; pass a shared ``tracker`` when outcomes
    are recorded elsewhere than on this router.
    """
    if spec.router.value in _BALANCER_NAMES:
        return make_balancer(spec.router.value, spec.choices_d)
    balancer = make_balancer(spec.balancer, spec.choices_d)
    if spec.router is RouterName.SPECIALIZATION:
        return SpecializationRouter(balancer, spec.specialization.fallback)
    if spec.router is RouterName.AFFINITY:
        return AffinityRouter(spec.affinity.load_factor, balancer)
    if spec.router is RouterName.SUCCESS_RATE:
        return SuccessRateRouter(spec.success_rate, clock, balancer, tracker)
    raise ValueError(f"unknown router {spec.router!r}")
