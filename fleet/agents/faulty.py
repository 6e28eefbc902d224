"""Agents that misbehave on purpose, chosen by their slot index, for resilience tests.

A host names its logical agents ``<pool>/<replica>/<index>``; ``FaultyAgent`` reads the
index and misbehaves when it is listed: flaky agents fail a share of their tasks with a
transient (retryable) error, hanging agents never answer (the host's watchdog fails
those tasks with reason ``timeout``). Every agent behaves once ``recover_after_s``
seconds have passed since the first agent with its id was created in the process, so a
test can watch breakers eject the bad agents and re-admit them. The fault stands for
something outside the agent (an upstream it calls), so a health restart of the agent
(its error rate trips the restart rule) does not put the deadline back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from typing import Any, ClassVar

from fleet.agent import Agent
from fleet.task import Task

HANG_S = 3_600.0


class UpstreamError(ConnectionError):
    """A transient failure of something the agent depends on (retryable by default)."""


def agent_index(agent_id: str) -> int:
    """The slot index a host gave the agent (the last part of its id), or -1."""
    tail = agent_id.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class FaultyAgent(Agent):
    """Sleeps ``delay_s`` and echoes the payload, unless its index is listed.

    Indexes in ``bad_agents`` fail ``fail_rate`` of their tasks with ``UpstreamError``;
    indexes in ``hang_agents`` hang on every task. Both recover ``recover_after_s``
    seconds after the first agent with this id was created (None: never). Failures are
    drawn from a generator seeded with ``seed`` and the index, so a run is reproducible.
    """

    capabilities = ("work",)
    # agent id -> when the first agent with that id was created (monotonic): the faults
    # end at the same time for the agent and for every restart of it.
    FIRST_CREATED: ClassVar[dict[str, float]] = {}

    def __init__(
        self,
        agent_id: str,
        delay_s: float = 0.01,
        bad_agents: Iterable[int] = (),
        fail_rate: float = 0.5,
        hang_agents: Iterable[int] = (),
        recover_after_s: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(agent_id, **kwargs)
        self.index = agent_index(agent_id)
        self.delay_s = delay_s
        self.flaky = self.index in set(bad_agents)
        self.hangs = self.index in set(hang_agents)
        self.fail_rate = fail_rate
        first = self.FIRST_CREATED.setdefault(agent_id, time.monotonic())
        self.recover_at = first + recover_after_s if recover_after_s is not None else None
        self._rng = random.Random(seed * 1_000_003 + self.index)

    def faulty(self) -> bool:
        """Whether the agent still misbehaves now."""
        return self.recover_at is None or time.monotonic() < self.recover_at

    async def handle(self, task: Task) -> Any:
        if self.hangs and self.faulty():
            left = HANG_S if self.recover_at is None else self.recover_at - time.monotonic()
            await asyncio.sleep(max(0.0, left))
        await asyncio.sleep(self.delay_s)
        if self.flaky and self.faulty() and self._rng.random() < self.fail_rate:
            raise UpstreamError(f"agent {self.index}: simulated upstream failure")
        return task.payload


class OutageAgent(Agent):
    """Calls a shared downstream service through its dependency breaker.

    The service (``SERVICE``, one per process: every agent of a host shares it) fails
    every call while ``SERVICE["down"]`` is true, and counts the calls that reach it, so
    a test can see the breaker stop calling a service that is down.
    """

    capabilities = ("work",)
    SERVICE: ClassVar[dict[str, Any]] = {"down": False, "calls": 0}

    def __init__(self, agent_id: str, dependency: str = "llm", **kwargs: Any):
        super().__init__(agent_id, **kwargs)
        self.dependency = dependency

    async def _service(self) -> str:
        self.SERVICE["calls"] += 1
        await asyncio.sleep(0)
        if self.SERVICE["down"]:
            raise UpstreamError(f"{self.dependency} is down")
        return "ok"

    async def handle(self, task: Task) -> Any:
        return await self.call_dependency(self.dependency, self._service)
