"""Agents with controllable behaviour, for tests, benchmarks and chaos runs."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fleet.agent import Agent, Reply
from fleet.task import Task


class SleepAgent(Agent):
    """Sleeps ``delay_s`` (or ``payload["sleep_s"]``) and echoes the payload.

    Misbehaviour on request, for tests: ``payload["fail"]`` raises;
    ``payload["wedge_s"]`` swallows every cancellation for that many seconds, then
    returns (a wedged agent); ``payload["exit"]`` ends the whole process at once
    (``os._exit``: a task that kills its host)."""

    capabilities = ("sleep",)

    def __init__(self, agent_id: str, delay_s: float = 0.01, **kwargs: Any):
        super().__init__(agent_id, **kwargs)
        self.delay_s = delay_s

    async def handle(self, task: Task) -> Any:
        p = task.payload if isinstance(task.payload, dict) else {}
        if p.get("exit"):
            os._exit(1)
        if p.get("wedge_s"):
            until = time.monotonic() + float(p["wedge_s"])
            while (left := until - time.monotonic()) > 0:
                try:
                    await asyncio.sleep(left)
                except asyncio.CancelledError:
                    pass  # wedged: ignores cancellation
        await asyncio.sleep(float(p.get("sleep_s", self.delay_s)))
        if p.get("fail"):
            raise ValueError(f"asked to fail: {p['fail']}")
        return task.payload


class PricedAgent(Agent):
    """Sleeps ``delay_s`` (or ``payload["sleep_s"]``), or computes for
    ``payload["spin_s"]`` CPU seconds (in 5 ms slices, letting other agents run between
    them), and reports ``input_tokens``/``output_tokens`` of ``model``, so every task
    has a known cost under the spec's prices (budget tests)."""

    capabilities = ("priced",)

    def __init__(
        self,
        agent_id: str,
        model: str = "test-model",
        input_tokens: int = 1000,
        output_tokens: int = 1000,
        delay_s: float = 0.01,
        **kwargs: Any,
    ):
        super().__init__(agent_id, **kwargs)
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.delay_s = delay_s

    async def handle(self, task: Task) -> Any:
        p = task.payload if isinstance(task.payload, dict) else {}
        if "spin_s" in p:
            left = float(p["spin_s"])
            while left > 0:
                t0 = time.thread_time()
                while time.thread_time() - t0 < min(left, 0.005):
                    pass
                left -= time.thread_time() - t0
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(float(p.get("sleep_s", self.delay_s)))
        return Reply(task.payload, self.input_tokens, self.output_tokens, self.model)


class DeepFailAgent(Agent):
    """Raises ``ValueError`` from ``depth`` calls below ``handle``, in ``parse_reply``:
    for tests of the traceback a failed result keeps (its raising frame is the last)."""

    capabilities = ("deep_fail",)

    def __init__(self, agent_id: str, depth: int = 3, **kwargs: Any):
        super().__init__(agent_id, **kwargs)
        self.depth = depth

    async def handle(self, task: Task) -> Any:
        return descend(self.depth, task.payload)


def descend(depth: int, payload: Any) -> Any:
    """``depth`` nested calls, then ``parse_reply``."""
    if depth <= 0:
        return parse_reply(payload)
    return descend(depth - 1, payload)


def parse_reply(payload: Any) -> Any:
    raise ValueError(f"cannot parse the reply to {payload!r}")
