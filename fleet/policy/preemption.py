"""Compute preemption (``pools[].preemption``, ``fleet.spec.preemption``): which running
task gives its slot to an urgent one. Pure; the dispatcher asks it when a pool is full
and its queue shards report a task that has waited past ``preempt_after_s``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fleet.spec.budgets import BudgetsSpec

PREEMPTED = "preempted"  # the reason a preempted run ends with (never recorded)
# The delay a host hands a preempted run back with: below zero, so the dispatcher
# tells it from a retry (it requeues it at once, its delivery refunded).
PREEMPTED_DELAY = -1.0


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
        self.max_preemptions = max_preemptions

    def rank(self, priority: int) -> int:
        return self._rank[priority]

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
