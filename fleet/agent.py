"""The Agent base class users subclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fleet.task import Task


@dataclass(frozen=True, slots=True)
class Reply:
    """What ``Agent.handle`` may return to report token use besides its output.

    A plain return value is taken as the output with no tokens used.
    """

    output: Any = None
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None


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
