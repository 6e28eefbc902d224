"""Agents with controllable behaviour, for tests, benchmarks and chaos runs."""

from __future__ import annotations

import asyncio
from typing import Any

from fleet.agent import Agent
from fleet.task import Task


class SleepAgent(Agent):
    """Sleeps ``delay_s`` (or ``payload["sleep_s"]``) and echoes the payload."""

    capabilities = ("sleep",)

    def __init__(self, agent_id: str, delay_s: float = 0.01, **kwargs: Any):
        super().__init__(agent_id, **kwargs)
        self.delay_s = delay_s

    async def handle(self, task: Task) -> Any:
        p = task.payload if isinstance(task.payload, dict) else {}
        await asyncio.sleep(float(p.get("sleep_s", self.delay_s)))
        if p.get("fail"):
            raise ValueError(f"asked to fail: {p['fail']}")
        return task.payload
