"""Resilience section: per-task time limits and what happens when a task fails."""

from __future__ import annotations

from pydantic import Field

from fleet.spec._base import SpecModel


class ResilienceSpec(SpecModel):
    """``task_timeout_s`` bounds one execution of a task on an agent; a task that
    exceeds it fails with reason ``timeout``. ``max_deliveries`` bounds how often a task
    whose holder died is handed out again before it fails with ``max_deliveries``."""

    task_timeout_s: float = Field(default=300.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
