"""Compute preemption (``pools[].preemption``, ``fleet.spec.preemption``): which running
task gives its slot to an urgent one, and how often a full pool looks for one. Pure; the
dispatcher (``fleet.runtime.dispatcher``) and the simulator (``fleet.sim.preemption``)
ask it when a pool is full and its queue reports a task that has waited past
``preempt_after_s``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fleet.spec.budgets import BudgetsSpec

PREEMPTED = "preempted"  # the reason a preempted run ends with (never recorded)
# The delay a host hands a preempted run back with: below zero, so the dispatcher
# tells it from a retry (it requeues it at once, its delivery refunded).
PREEMPTED_DELAY = -1.0
# How often a full pool looks for an urgent task: a quarter of its preempt_after_s,
# within these bounds (``check_period_s``).
PREEMPT_CHECK_MIN_S = 0.05
PREEMPT_CHECK_MAX_S = 0.5


def check_period_s(preempt_after_s: float) -> float:
    """Seconds between a pool's looks for an urgent task: a task waits at most
    ``preempt_after_s`` plus this before its preemption is asked (while a victim
    exists), and a check costs the shards a round trip, hence the bounds."""
    return max(PREEMPT_CHECK_MIN_S, min(preempt_after_s / 4, PREEMPT_CHECK_MAX_S))


@dataclass(frozen=True, slots=True)
class RunningTask:
    """A task the dispatcher has handed to a host."""

    id: str
    priority: int
    started_s: float  # when it was sent (the dispatcher's clock)
    preemptions: int  # times it was preempted before


class PreemptionRule:
    """Class ranks from ``budgets.priority_classes`` (0: the highest class)."""

    def __init__(self, budgets: BudgetsSpec, max_preemptions: int):
        classes = [c.name for c in budgets.priority_classes]
        self._rank = [classes.index(budgets.class_of_task(p).name) for p in range(10)]
        self._lowest = max(self._rank)
        self.max_preemptions = max_preemptions

    def rank(self, priority: int) -> int:
        return self._rank[priority]

    def may_preempt(self, priority: int) -> bool:
        """Whether a task of ``priority`` can have a victim at all: some class ranks
        below its own. False for the lowest class, so a caller may skip gathering what
        runs (an overloaded pool's urgent task is often of the lowest class)."""
        return self._rank[priority] < self._lowest

    def victim(
        self, urgent_priority: int, running: Iterable[RunningTask]
    ) -> RunningTask | None:
        """The task to preempt for a waiting task of ``urgent_priority``: among those of
        a lower class, preempted fewer than ``max_preemptions`` times, the one of the
        lowest class and priority, and of those the one sent last (the least work
        lost). None: no task may give way."""
        urgent = self._rank[urgent_priority]
        best: RunningTask | None = None
        best_key: tuple[int, int, float] | None = None
        for t in running:
            rank = self._rank[t.priority]
            if rank <= urgent or t.preemptions >= self.max_preemptions:
                continue
            key = (-rank, t.priority, -t.started_s)
            if best_key is None or key < best_key:
                best, best_key = t, key
        return best
