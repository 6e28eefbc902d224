"""Sharing a total (USD, tokens, CPU) among agents: equal, weighted, by size, or dynamic.

Every policy is the same computation with a different weight and cap per agent:

=========  ========================  =====================================
policy     weight                    cap
=========  ========================  =====================================
equal      1                         ``max``
weighted   ``Claim.weight``          ``max``
resource   ``Claim.size``            ``max``
dynamic    ``Claim.weight``          ``min(max, demand)`` (never below min)
=========  ========================  =====================================

``allocate`` works in three phases:

1. **Used.** An agent keeps what it already consumed in the window (``used``): money
   spent cannot be handed to someone else.
2. **Minimums**, by priority class, highest first. A class whose minimums the rest of
   the total cannot cover shares what is left in proportion to what each still needs,
   and the classes below it get nothing more: under overload, lower priority loses first.
3. **Surplus** by water-filling: raise a common level ``L`` and give each agent
   ``clamp(L * weight, floor, cap)`` until the total (or every cap) is reached. With
   ``Preemption.STRICT`` classes are filled one after the other, highest first; with
   ``Preemption.WEIGHTED`` all at once (the priority then matters only for minimums, and
   a class's influence comes from its weights).

Why water-filling is max-min fair: at the end every agent strictly between its floor
and cap sits at the same normalized share ``x / weight = L``; an agent at its cap has
``cap / weight <= L`` and one at its floor has ``floor / weight >= L``. Raising any agent
not at its cap would therefore need taking from an agent whose normalized share is
already >= its own, which is the definition of (weighted) max-min fairness. The level
is found exactly by sweeping the sorted breakpoints ``floor / weight`` and
``cap / weight`` (O(n log n)), not by bisection.

Nothing here reads a clock; ``Allocator`` keeps the claims of a changing population
(agents joining and leaving) and recomputes lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from itertools import groupby
from typing import Any


class Policy(str, Enum):
    EQUAL = "equal"
    WEIGHTED = "weighted"
    RESOURCE = "resource"  # by agent size (CPUs, GPUs, memory, ...)
    DYNAMIC = "dynamic"  # max-min fair over demands


class Preemption(str, Enum):
    STRICT = "strict"  # surplus goes to higher priority classes first
    WEIGHTED = "weighted"  # surplus shared by weight across classes


@dataclass(frozen=True, slots=True)
class Claim:
    """What one agent asks of a shared total (all amounts in the total's unit).

    ``min``/``max`` bound its share, ``weight`` and ``size`` set its share under the
    weighted and resource policies, ``demand`` what it would use if unconstrained
    (dynamic policy; None: as much as ``max``), ``priority`` its class (higher is more
    important), ``used`` what it already consumed in this window.
    """

    agent_id: str
    min: float = 0.0
    max: float = math.inf
    weight: float = 1.0
    size: float = 1.0
    demand: float | None = None
    priority: int = 0
    used: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min", "max", "used"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"claim {self.agent_id}: {name} {value} must be >= 0")
        if self.min > self.max:
            raise ValueError(f"claim {self.agent_id}: min {self.min} > max {self.max}")
        for name in ("weight", "size"):
            value = getattr(self, name)
            if not (0 < value < math.inf):
                raise ValueError(
                    f"claim {self.agent_id}: {name} {value} must be > 0 and finite"
                )
        if self.demand is not None and not self.demand >= 0:
            raise ValueError(f"claim {self.agent_id}: demand {self.demand} must be >= 0")


@dataclass(frozen=True, slots=True)
class Allocation:
    """The result: ``shares`` per agent, and who fell short of what."""

    total: float
    shares: dict[str, float]
    below_min: frozenset[str]  # got less than their minimum (the total did not allow it)
    below_cap: frozenset[str]  # got less than their cap (demand or max)
    allocated: float  # the sum of the shares

    @property
    def unallocated(self) -> float:
        return max(0.0, self.total - self.allocated)


@dataclass(slots=True)
class _Slot:
    agent_id: str
    priority: int
    hard: float  # used: never below
    lo: float  # max(min, used)
    hi: float  # cap, >= lo
    weight: float
    x: float = 0.0


def _slot(c: Claim, policy: Policy) -> _Slot:
    lo = max(c.min, c.used)
    hi = c.max
    if policy is Policy.DYNAMIC and c.demand is not None:
        hi = min(c.max, max(c.min, c.demand))
    hi = max(hi, lo)  # a claim that already used more than its cap keeps what it used
    weight = {Policy.EQUAL: 1.0, Policy.RESOURCE: c.size}.get(policy, c.weight)
    return _Slot(c.agent_id, c.priority, c.used, lo, hi, weight, c.used)


def water_fill(slots: Sequence[_Slot], budget: float) -> None:
    """Raise ``slots`` from their current ``x`` (the floor) towards their ``hi`` by a
    common weighted level, spending at most ``budget``; updates ``x`` in place."""
    if budget <= 0 or not slots:
        return
    room = math.fsum(s.hi - s.x for s in slots)
    if room <= budget:
        for s in slots:
            s.x = s.hi
        return
    # g(L) = sum(clamp(L * w, floor, hi) - floor) is continuous, piecewise linear and
    # non-decreasing in L; it bends where L * w meets floor (slope += w) or hi
    # (slope -= w). Sweep the bends in order until g reaches the budget.
    bends: list[tuple[float, float]] = []
    for s in slots:
        bends.append((s.x / s.weight, s.weight))
        if s.hi < math.inf:
            bends.append((s.hi / s.weight, -s.weight))
    bends.sort()
    level = 0.0
    given = 0.0
    slope = 0.0
    target = budget
    for at, dw in bends:
        step = slope * (at - level)
        if given + step >= target and slope > 0:
            level += (target - given) / slope
            break
        given += step
        level = at
        slope += dw
    else:
        level += (target - given) / slope if slope > 0 else 0.0
    for s in slots:
        s.x = min(max(level * s.weight, s.x), s.hi)


def _trim(slots: Sequence[_Slot], total: float) -> None:
    """Take float rounding excess (a few ulps) off the agents with the most slack, so the
    allocated sum never exceeds the total, not even by one ulp."""
    for _ in range(64):
        excess = math.fsum(s.x for s in slots) - total
        if excess <= 0:
            return
        # Prefer slack above the minimum, so no one is pushed under its min by rounding.
        s = max(
            (s for s in slots if s.x > s.hard),
            key=lambda s: (max(s.x - s.lo, 0.0), s.x - s.hard),
        )
        floor = s.lo if s.x > s.lo else s.hard
        s.x = max(floor, math.nextafter(s.x - excess, -math.inf))
    raise AssertionError("allocation could not be trimmed to the total")  # pragma: no cover


def allocate(
    total: float,
    claims: Iterable[Claim],
    policy: Policy = Policy.DYNAMIC,
    preemption: Preemption = Preemption.STRICT,
) -> Allocation:
    """Share ``total`` among ``claims``; see the module docstring for the rules.

    Guarantees: the shares sum to at most ``total``; each is at least the claim's
    ``used``; each is at least its ``min`` whenever the minimums of all claims fit in
    the total (``sum(max(min, used)) <= total``); none exceeds ``max`` (unless ``used``
    already did). Raises ValueError if the claims already used more than the total.
    """
    if not total >= 0:
        raise ValueError(f"total {total} must be >= 0")
    slots = [_slot(c, policy) for c in claims]
    if len({s.agent_id for s in slots}) != len(slots):
        raise ValueError("two claims for the same agent")
    used = math.fsum(s.hard for s in slots)
    if used > total:
        raise ValueError(f"claims already used {used} > total {total}")
    by_class = [
        list(g)
        for _, g in groupby(sorted(slots, key=lambda s: -s.priority), key=lambda s: s.priority)
    ]

    # Phase 2: minimums, highest class first.
    for group in by_class:
        left = total - math.fsum(s.x for s in slots)
        need = math.fsum(s.lo - s.x for s in group)
        if need <= left:
            for s in group:
                s.x = s.lo  # assigned, not added, so x == lo exactly
            continue
        if left > 0 and need > 0:
            share = left / need
            for s in group:
                s.x = s.x + (s.lo - s.x) * share
        break

    # Phase 3: surplus.
    groups = by_class if preemption is Preemption.STRICT else [slots]
    for group in groups:
        left = total - math.fsum(s.x for s in slots)
        if left <= 0:
            break
        water_fill(group, left)
    _trim(slots, total)

    eps = 1e-9
    return Allocation(
        total=total,
        shares={s.agent_id: s.x for s in slots},
        below_min=frozenset(s.agent_id for s in slots if s.x < s.lo * (1 - eps) - eps),
        below_cap=frozenset(s.agent_id for s in slots if s.x < s.hi * (1 - eps) - eps),
        allocated=math.fsum(s.x for s in slots),
    )


class Allocator:
    """The shares of a changing population, recomputed when it changes.

    Use it where agents join and leave (a pool, a budget controller): ``join`` or
    ``update`` a claim, ``leave``, ``set_total``; ``allocation()`` recomputes only when
    something changed since the last call.
    """

    def __init__(
        self,
        total: float,
        policy: Policy = Policy.DYNAMIC,
        preemption: Preemption = Preemption.STRICT,
    ):
        self.total = total
        self.policy = policy
        self.preemption = preemption
        self._claims: dict[str, Claim] = {}
        self._cached: Allocation | None = None

    def join(self, claim: Claim) -> None:
        self._claims[claim.agent_id] = claim
        self._cached = None

    update = join

    def update_fields(self, agent_id: str, **changes: Any) -> None:
        """Change some fields of an agent's claim (e.g. ``demand``, ``used``)."""
        self.join(replace(self._claims[agent_id], **changes))

    def leave(self, agent_id: str) -> None:
        if self._claims.pop(agent_id, None) is not None:
            self._cached = None

    def set_total(self, total: float) -> None:
        self.total = total
        self._cached = None

    @property
    def claims(self) -> Mapping[str, Claim]:
        return self._claims

    def allocation(self) -> Allocation:
        if self._cached is None:
            self._cached = allocate(
                self.total, self._claims.values(), self.policy, self.preemption
            )
        return self._cached

    def share(self, agent_id: str) -> float:
        return self.allocation().shares[agent_id]
