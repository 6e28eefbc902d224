"""Queue disciplines: the order in which a queue hands out its ready items.

Pure: a discipline sees ``Item`` fields and, where the order depends on time, an
explicit ``now_unix_s``. The lease queue, the simulator and the tests use the same
objects.

Each discipline defines two views of one order:

- ``value(item, now_unix_s)``: the item's effective value at ``now`` (higher goes
  first). This is the definition, and the oracle the property tests check against.
- ``key(item)``: a *static* sort key (lower goes first) that orders items exactly as
  ``value`` does at every ``now``. A heap keyed on it never needs re-sorting as time
  passes. That is possible because every discipline here ages all waiting items at the
  same rate, so the difference between two items' values never changes with ``now``:

  * priority with aging: value = priority + wait_s / s_per_level. Comparing two items,
    the ``now`` terms cancel, leaving submitted - s_per_level * priority (lower first).
    Consequence (the aging bound): an item x is overtaken by y only if
    y.submitted <= x.submitted + s_per_level * (y.priority - x.priority)
    <= x.submitted + aging_limit_s. Whatever arrives later than that waits behind x,
    so x waits at most for the finite work submitted before x.submitted +
    aging_limit_s: no starvation beyond the aging limit.
  * utility, linear decay: value = u - d * wait_s; static key -(u + d * submitted).
  * utility, exponential decay: value = u * 2 ** (-wait_s / h); log2 |value| differs
    between items by a constant, so the key is log2 |u| + submitted / h (its sign
    chosen per sign of u: positive values first, then zero, then negative).
  * EDF: the deadline itself, already static.

Ties go to the earlier submit time, then to the earlier arrival (the queue adds a
sequence number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from fleet.spec.queues import DEFAULT_UTILITY, Discipline, QueueSpec
from fleet.task import MAX_PRIORITY, MIN_PRIORITY, Item, Outcome, failed_outcome

DEADLINE_EXCEEDED = "deadline_exceeded"

SortKey = tuple[float, ...]


class DisciplinePolicy(Protocol):
    """An ordering of ready items: ``key`` (static, lower first) realises ``value``."""

    @property
    def discipline(self) -> Discipline: ...

    def key(self, item: Item) -> SortKey: ...

    def value(self, item: Item, now_unix_s: float) -> float: ...


def is_overdue(item: Item, now_unix_s: float) -> bool:
    """True when the item has a deadline and it has passed: it must fail with
    ``deadline_exceeded`` rather than be handed out (whatever the discipline)."""
    return item.deadline_unix_s is not None and item.deadline_unix_s <= now_unix_s


def overdue_outcome(item: Item, now_unix_s: float, pool: str | None = None) -> Outcome:
    """The failed outcome the caller records for an item returned as overdue."""
    late = now_unix_s - (item.deadline_unix_s or now_unix_s)
    return failed_outcome(
        item,
        DEADLINE_EXCEEDED,
        f"deadline {item.deadline_unix_s:.3f} passed {late:.3f} s before the task could "
        f"start (delivered {item.deliveries} times)",
        pool=pool,
        now_unix_s=now_unix_s,
    )


@dataclass(frozen=True, slots=True)
class Fifo:
    """Oldest first. (The lease queue uses a deque for this; the key is for others.)"""

    discipline: Discipline = Discipline.FIFO

    def key(self, item: Item) -> SortKey:
        return (item.submitted_unix_s,)

    def value(self, item: Item, now_unix_s: float) -> float:
        return now_unix_s - item.submitted_unix_s


@dataclass(frozen=True, slots=True)
class StrictPriority:
    """Highest priority first, oldest first within a priority. Low priority can starve:
    use ``AgingPriority`` unless that is what you want."""

    discipline: Discipline = Discipline.PRIORITY

    def key(self, item: Item) -> SortKey:
        return (-item.priority, item.submitted_unix_s)

    def value(self, item: Item, now_unix_s: float) -> float:
        # Lexicographic (priority, age) folded into one number for the oracle: ages are
        # far below 1e9 s, so the priority term dominates.
        return item.priority * 1e9 + (now_unix_s - item.submitted_unix_s)


@dataclass(frozen=True, slots=True)
class AgingPriority:
    """Priority that rises with waiting time: one level per ``s_per_level`` seconds.

    ``aging_limit_s`` is the head start of the highest priority over the lowest: no
    item is overtaken by an item submitted more than ``aging_limit_s`` after it.
    """

    aging_limit_s: float
    min_priority: int = MIN_PRIORITY
    max_priority: int = MAX_PRIORITY
    discipline: Discipline = Discipline.PRIORITY

    def __post_init__(self) -> None:
        if not self.aging_limit_s > 0:
            raise ValueError(f"aging_limit_s must be > 0, got {self.aging_limit_s}")
        if self.max_priority <= self.min_priority:
            raise ValueError(
                f"max_priority ({self.max_priority}) must exceed "
                f"min_priority ({self.min_priority})"
            )

    @property
    def s_per_level(self) -> float:
        return self.aging_limit_s / (self.max_priority - self.min_priority)

    def key(self, item: Item) -> SortKey:
        return (
            item.submitted_unix_s - self.s_per_level * item.priority,
            item.submitted_unix_s,
        )

    def value(self, item: Item, now_unix_s: float) -> float:
        return item.priority + (now_unix_s - item.submitted_unix_s) / self.s_per_level


@dataclass(frozen=True, slots=True)
class EarliestDeadline:
    """Earliest deadline first; items without a deadline after all that have one, FIFO.

    Overdue items are never handed out: the queue returns them for a failed outcome
    with reason ``deadline_exceeded`` (``is_overdue``)."""

    discipline: Discipline = Discipline.DEADLINE

    def key(self, item: Item) -> SortKey:
        d = item.deadline_unix_s
        return (math.inf if d is None else d, item.submitted_unix_s)

    def value(self, item: Item, now_unix_s: float) -> float:
        # Minus the slack: the less time left, the more urgent.
        d = item.deadline_unix_s
        return -math.inf if d is None else -(d - now_unix_s)


@dataclass(frozen=True, slots=True)
class Utility:
    """Highest value first. The value is the task's ``utility`` (``default_utility``
    when unset), decaying while it waits: linearly by ``decay_per_s`` value units per
    second, or exponentially with ``half_life_s``; no decay when both are unset."""

    default_utility: float = DEFAULT_UTILITY
    decay_per_s: float = 0.0
    half_life_s: float | None = None
    discipline: Discipline = Discipline.UTILITY

    def __post_init__(self) -> None:
        if self.decay_per_s < 0:
            raise ValueError(f"decay_per_s must be >= 0, got {self.decay_per_s}")
        if self.half_life_s is not None and not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {self.half_life_s}")
        if self.decay_per_s > 0 and self.half_life_s is not None:
            raise ValueError("decay_per_s and half_life_s are exclusive")

    def _u(self, item: Item) -> float:
        return self.default_utility if item.utility is None else item.utility

    def key(self, item: Item) -> SortKey:
        u, t0 = self._u(item), item.submitted_unix_s
        if self.half_life_s is None:
            return (0.0, -(u + self.decay_per_s * t0), t0)
        if u > 0:
            return (0.0, -(math.log2(u) + t0 / self.half_life_s), t0)
        if u == 0:
            return (1.0, 0.0, t0)
        return (2.0, math.log2(-u) + t0 / self.half_life_s, t0)

    def value(self, item: Item, now_unix_s: float) -> float:
        u, wait = self._u(item), now_unix_s - item.submitted_unix_s
        if self.half_life_s is not None:
            decay: float = 2.0 ** (-wait / self.half_life_s)  # float ** float is Any
            return u * decay
        return u - self.decay_per_s * wait


def make_discipline(
    discipline: Discipline,
    *,
    priority_aging_limit_s: float | None = None,
    default_utility: float = DEFAULT_UTILITY,
    utility_decay_per_s: float = 0.0,
    utility_half_life_s: float | None = None,
) -> DisciplinePolicy:
    """The policy object for a discipline and its parameters (units as in QueueSpec)."""
    if discipline is Discipline.FIFO:
        return Fifo()
    if discipline is Discipline.PRIORITY:
        if priority_aging_limit_s is None:
            return StrictPriority()
        return AgingPriority(priority_aging_limit_s)
    if discipline is Discipline.DEADLINE:
        return EarliestDeadline()
    if discipline is Discipline.UTILITY:
        return Utility(default_utility, utility_decay_per_s, utility_half_life_s)
    raise ValueError(f"unknown discipline {discipline!r}")


def discipline_from_spec(spec: QueueSpec) -> DisciplinePolicy:
    """The policy a QueueSpec asks for."""
    return make_discipline(
        spec.discipline,
        priority_aging_limit_s=spec.priority_aging_limit_s,
        default_utility=spec.default_utility,
        utility_decay_per_s=spec.utility_decay_per_s,
        utility_half_life_s=spec.utility_half_life_s,
    )


__all__ = [
    "DEADLINE_EXCEEDED",
    "AgingPriority",
    "DisciplinePolicy",
    "EarliestDeadline",
    "Fifo",
    "StrictPriority",
    "Utility",
    "discipline_from_spec",
    "is_overdue",
    "make_discipline",
    "overdue_outcome",
]
