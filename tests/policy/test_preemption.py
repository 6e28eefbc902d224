"""Which running task gives way to an urgent one (``fleet.policy.preemption``)."""

from __future__ import annotations

from fleet.policy.preemption import PreemptionRule, RunningTask
from fleet.spec.budgets import BudgetsSpec, PriorityClass

BUDGETS = BudgetsSpec(
    priority_classes=[
        PriorityClass(name="urgent", min_task_priority=7),
        PriorityClass(name="normal", min_task_priority=4),
        PriorityClass(name="bulk"),
    ]
)


def test_the_lowest_class_gives_way_and_of_those_the_one_sent_last():
    rule = PreemptionRule(BUDGETS, max_preemptions=2)
    running = [
        RunningTask("n", 5, started_s=0.0, preemptions=0),
        RunningTask("b-old", 1, started_s=1.0, preemptions=0),
        RunningTask("b-new", 1, started_s=2.0, preemptions=0),
        RunningTask("b-higher", 3, started_s=3.0, preemptions=0),
    ]
    assert rule.victim(9, running).id == "b-new"  # bulk, priority 1, the least work lost
    # a normal task may preempt bulk work, never normal or urgent work
    assert rule.victim(5, running).id == "b-new"
    assert rule.victim(5, [running[0]]) is None
    assert rule.victim(3, running) is None  # bulk preempts nothing


def test_a_task_preempted_max_preemptions_times_runs_to_its_end():
    rule = PreemptionRule(BUDGETS, max_preemptions=2)
    tired = RunningTask("b", 1, started_s=0.0, preemptions=2)
    fresh = RunningTask("n", 5, started_s=0.0, preemptions=1)
    assert rule.victim(9, [tired, fresh]).id == "n"
    assert rule.victim(9, [tired]) is None
    assert [rule.rank(p) for p in (9, 7, 6, 4, 3, 0)] == [0, 0, 1, 1, 2, 2]


def test_only_a_class_with_one_below_it_may_preempt():
    rule = PreemptionRule(BUDGETS, max_preemptions=2)
    assert [rule.may_preempt(p) for p in (9, 7, 6, 4, 3, 0)] == [True] * 4 + [False] * 2
    running = [RunningTask("n", 5, started_s=0.0, preemptions=0)]
    assert rule.victim(3, running) is None  # what may_preempt(3) says without a scan
