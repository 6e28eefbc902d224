"""A pool's compute preemption: when the pool is full and a task of a higher priority
class has waited longer than ``preempt_after_s``, the running task of the lowest class
is cancelled and requeued (not failed, its delivery not counted) and the urgent task
takes its slot. A task preempted ``max_preemptions`` times runs to its end.

Off by default. It needs the ``priority`` queue discipline (so the slot it frees goes to
the urgent task) and at least two ``budgets.priority_classes`` (classes are what
preempt what: the fleet's one definition of priority classes). The dispatcher runs it
(``fleet.runtime.dispatcher``), with the pure choice in ``fleet.policy.preemption``.
"""

from __future__ import annotations

from pydantic import Field

from fleet.spec._base import SpecModel


class PreemptionSpec(SpecModel):
    enabled: bool = False
    preempt_after_s: float = Field(default=5.0, gt=0, le=86_400, allow_inf_nan=False)
    max_preemptions: int = Field(default=2, ge=1, le=100)
