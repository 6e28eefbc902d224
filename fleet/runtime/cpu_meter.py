"""The CPU time one task's agent spends, on a host whose agents share one thread.

A host runs its agents as coroutines on one event loop, so the thread's CPU time before
and after a task counts every agent that ran meanwhile. ``CpuMeter`` wraps the agent's
coroutine and adds up the thread CPU time (``time.thread_time``) of each of its steps
alone, from one resumption to the next suspension: a sleeping agent (waiting on a model
API) is charged about nothing, a computing one what it computed. What the coroutine
awaits runs inside its steps when it is a coroutine itself (``await other()``), and
outside them when it is a task or a callback of its own (``asyncio.gather`` of
coroutines runs them as tasks: not counted).

Hand-written: asyncio has no per-task CPU accounting, and a step costs two clock reads
(about a microsecond), paid only on hosts that enforce budgets (``cpu_s`` quotas).
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Generator
from typing import Any


class CpuMeter(Coroutine[Any, Any, Any]):
    """Awaits one coroutine (``run``) and keeps the CPU seconds of its steps in
    ``cpu_s``, including those of a run cut short (cancelled, preempted, failed)."""

    __slots__ = ("_coro", "cpu_s")

    def __init__(self) -> None:
        self._coro: Coroutine[Any, Any, Any] | None = None
        self.cpu_s = 0.0

    def run(self, coro: Coroutine[Any, Any, Any]) -> CpuMeter:
        """Meter ``coro``: ``await meter.run(coro)`` is ``await coro``."""
        self._coro = coro
        return self

    def send(self, value: Any) -> Any:
        t0 = time.thread_time()
        try:
            return self._coro.send(value)  # type: ignore[union-attr]
        finally:
            self.cpu_s += time.thread_time() - t0

    def throw(self, *args: Any) -> Any:
        t0 = time.thread_time()
        try:
            return self._coro.throw(*args)  # type: ignore[union-attr]
        finally:
            self.cpu_s += time.thread_time() - t0

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> CpuMeter:
        return self

    def __next__(self) -> Any:
        return self.send(None)
