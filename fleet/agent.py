"""The Agent base class users subclass."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from fleet.task import Task

T = TypeVar("T")


class DependencyUnavailable(Exception):
    """A call refused because the dependency's circuit breaker is open.

    Retryable by default (``resilience.retry.retryable_errors``): the task goes back to
    the queue after a backoff instead of waiting on a service that is down.
    """


class _Breaker(Protocol):
    def try_acquire(self) -> bool: ...
    def release(self) -> None: ...
    def record(self, ok: bool, latency_s: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """What ``Agent.handle`` may return to report token use besides its output.

    A plain return value is taken as the output with no tokens used.
    """

    output: Any = None
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None


_SIMULATED: Any = None


def _simulated_llm() -> Any:
    """One simulated model for every agent outside a host (imported late: the
    ``fleet.agents`` package imports this module)."""
    global _SIMULATED
    if _SIMULATED is None:
        from fleet.agents.llm import SimulatedLLM

        _SIMULATED = SimulatedLLM()
    return _SIMULATED


class Agent:
    """A logical agent. Subclass it and implement ``handle``.

    One instance is created per logical agent and lives as long as the agent does, so
    it may keep state across tasks (a conversation cache, counters). ``handle`` runs on
    the host's event loop: await I/O, and push CPU-heavy work to a thread with
    ``asyncio.to_thread``. An exception fails the task with its text; the agent keeps
    running.
    """

    capabilities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, agent_id: str, **kwargs: Any):
        self.agent_id = agent_id
        # Set by the host: the breaker of a downstream dependency by name, shared by
        # the host's agents (``resilience.dependency_breaker(s)`` in the spec).
        self.dependency_breaker: Callable[[str], _Breaker] | None = None
        # The model it calls (``fleet.llm``): the pool's ``llm`` client, set by the host
        # when the pool names one; until then a simulated model, so an agent runs as
        # written in a test or a notebook.
        self.llm: Any = _simulated_llm()

    async def call_dependency(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call()`` through the circuit breaker of downstream dependency ``name``.

        Use it around calls to an LLM API, a database or any service that may fail for
        everyone at once. While the breaker is open the call is not made and
        ``DependencyUnavailable`` is raised (a retryable failure); an exception or a
        call slower than the breaker's ``slow_call_duration_s`` counts against the
        dependency. Outside a host (no breaker set) the call is simply made.
        """
        get = getattr(self, "dependency_breaker", None)
        breaker = get(name) if get is not None else None
        if breaker is None:
            return await call()
        if not breaker.try_acquire():
            raise DependencyUnavailable(
                f"dependency {name!r} is unavailable: its circuit breaker is open"
            )
        t0 = time.monotonic()
        try:
            result = await call()
        except BaseException:
            breaker.record(False, time.monotonic() - t0)
            raise
        breaker.record(True, time.monotonic() - t0)
        return result

    async def setup(self) -> None:
        """Called once before the agent's first task."""

    async def heartbeat(self) -> None:
        """Called by the host every ``health.heartbeat_interval_s`` (if overridden).

        Return to report the agent alive; raise, or take longer than the interval, to
        report it not: after ``heartbeat_timeout_s`` without one, it is restarted. Check
        what the agent itself depends on (a client, a cache); keep it cheap. Agents that
        do not override it are alive as long as their host's event loop runs.
        """

    async def handle(self, task: Task) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.handle")
