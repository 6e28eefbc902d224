"""The agent instances of one ``AgentHost``: made on first use, set up, pinged for their
heartbeats and restarted, as its ``HostCore`` asks.

The core knows agents by index (``CoreAgent``: slots, routability, health); the
``Agent`` objects that run the tasks live here, one per logical agent, or None until
one is needed (or while one restarts). Restarts and pings run as background tasks of the
host's event loop; what they learn goes back to the core (``heartbeat``,
``restart_done``, ``restart_failed``), and ``on_change`` has the host apply whatever the
core decided on it.

The agents' lives are logged on ``fleet.control``: each restart (and a restart that
failed), and what the breakers decide (``BreakerLogger``: an agent ejected, readmitted,
an ejection the cap denied, panic mode).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fleet.agent import Agent
from fleet.observability.logs import CONTROL_LOG, log_event
from fleet.policy.breaker import BreakerEvent, BreakerState, EventKind
from fleet.policy.host import HostCore
from fleet.runtime.host_outcomes import error_text
from fleet.spec.health import HealthSpec

RESTART_ERROR_CHARS = 500  # of a failed restart's error, in its health event


def custom_heartbeat(agent: Agent) -> bool:
    """The agent beats on its own (overrides ``Agent.heartbeat``); the core beats for
    the others."""
    return type(agent).heartbeat is not Agent.heartbeat


class BreakerLogger:
    """A breaker listener (``fleet.policy.breaker.BreakerListener``) logging the
    breakers' decisions: an agent breaker opening is an ejection (WARNING), closing a
    readmission (INFO); a dependency breaker the same as ``dependency_open`` and
    ``dependency_closed``. Half-open turns are probes, not decisions: not logged."""

    def __init__(self, pool: str):
        self.pool = pool

    def on_breaker_event(self, event: BreakerEvent) -> None:
        kind, new = event.kind, event.new
        fields: dict[str, Any] = {}
        if kind is EventKind.TRANSITION:
            if new is BreakerState.HALF_OPEN:
                return
            opened = new is BreakerState.OPEN
            level = logging.WARNING if opened else logging.INFO
            what, _, name = event.name.partition(":")  # "agent:<id>" | "dependency:<name>"
            if what == "agent":
                name_event = "agent_ejected" if opened else "agent_readmitted"
                fields["agent_id"] = name
            else:
                name_event = "dependency_open" if opened else "dependency_closed"
                fields["dependency"] = name or event.name
        else:  # ejection_denied, panic_start, panic_end
            name_event = kind.value
            level = logging.INFO if kind is EventKind.PANIC_END else logging.WARNING
            fields["breaker"] = event.name
        log_event(
            CONTROL_LOG,
            level,
            name_event,
            pool=self.pool,
            **fields,
            old=event.old.value if event.old is not None else None,
            new=new.value if new is not None else None,
            reason=event.reason or None,
        )


class AgentSet:
    """Agent ``i`` of the host: ``agent_cls(core.agents[i].id, **agent_kwargs)``, wired
    to the host's dependency breakers and given the pool's model client (``llm``)."""

    def __init__(
        self,
        agent_cls: type[Agent],
        agent_kwargs: dict[str, Any],
        core: HostCore,
        health: HealthSpec,
        on_change: Callable[[], None],
        llm: Any = None,
    ):
        self._cls = agent_cls
        self.llm = llm  # the pool's model client, shared by its agents (``self.llm``)
        self._kwargs = agent_kwargs
        self.core = core
        self.health = health
        self._on_change = on_change
        self.instances: list[Agent | None] = [None] * len(core.agents)
        self._bg: set[asyncio.Task[Any]] = set()  # restarts and heartbeat pings
        self._pinging: set[int] = set()
        self.pool = core.host_id.rsplit("/", 1)[0]  # host ids are "<pool>/<replica>"
        # The shell of the agents' lives hears the breakers' ejections too, to log them.
        core.breakers.registry.add_listener(BreakerLogger(self.pool))

    async def get(self, i: int) -> Agent:
        """Agent i, made and set up first if it does not exist."""
        agent = self.instances[i]
        if agent is None:
            agent = self._new(i)
            await agent.setup()
            self.instances[i] = agent
            self._adopt(i, agent)
        return agent

    def drop(self, i: int) -> None:
        """Forget agent i's instance: a fresh one is made when it is next needed (the
        core beats for it meanwhile)."""
        self.instances[i] = None
        self.core.custom_beat.discard(i)

    def start(self, restart: Iterable[tuple[int, int]], beat: Iterable[int]) -> None:
        """Start the restarts (agent, attempt) and heartbeat pings the core asked for."""
        loop = asyncio.get_running_loop()
        for i, attempt in restart:
            self._spawn(loop, self._restart(i, attempt))
        for i in beat:
            agent = self.instances[i]
            if agent is not None and i not in self._pinging:
                self._pinging.add(i)
                self._spawn(loop, self._ping(i, agent))

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
        t = loop.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def _new(self, i: int) -> Agent:
        """A fresh instance of agent i (not set up yet)."""
        agent = self._cls(self.core.agents[i].id, **self._kwargs)
        agent.dependency_breaker = self.core.breakers.registry.dependency
        if self.llm is not None:
            agent.llm = self.llm
        return agent

    def _adopt(self, i: int, agent: Agent) -> None:
        """Agent i's router-visible attributes: expertise (task types it is best at),
        weight (relative speed of one slot), and whether it beats on its own."""
        a = self.core.agents[i]
        a.expertise = frozenset(getattr(agent, "expertise", ()) or ())
        a.weight = float(getattr(agent, "weight", 1.0))
        if custom_heartbeat(agent):
            self.core.custom_beat.add(i)
        else:
            self.core.custom_beat.discard(i)

    async def _ping(self, i: int, agent: Agent) -> None:
        """Ask an agent for its heartbeat; no answer within the interval is none."""
        try:
            await asyncio.wait_for(agent.heartbeat(), self.health.heartbeat_interval_s)
        except Exception:
            return  # missed: the monitor notices when heartbeat_timeout_s has passed
        finally:
            self._pinging.discard(i)
        if self.instances[i] is agent:
            self.core.heartbeat(i)
            self._on_change()

    def _restart_reason(self, agent_id: str) -> str | None:
        """Why health restarts the agent: the reason of its newest health event that
        gives one (restarts are rare: a scan of the kept events is cheap)."""
        for e in reversed(self.core.health.events.events):
            if e.subject == agent_id and e.reason:
                return e.reason
        return None

    async def _restart(self, i: int, attempt: int) -> None:
        """A new instance of agent i, set up again; in service once it reports."""
        agent_id = self.core.agents[i].id
        log_event(
            CONTROL_LOG,
            logging.WARNING,
            "agent_restart",
            pool=self.pool,
            agent_id=agent_id,
            attempt=attempt,
            reason=self._restart_reason(agent_id),
        )
        self.drop(i)  # the core beats for it until it is back
        try:
            agent = self._new(i)
            await asyncio.wait_for(agent.setup(), self.health.startup_timeout_s)
            if custom_heartbeat(agent):
                await asyncio.wait_for(agent.heartbeat(), self.health.heartbeat_interval_s)
        except Exception as exc:
            text = error_text(exc, RESTART_ERROR_CHARS)
            log_event(
                CONTROL_LOG,
                logging.WARNING,
                "agent_restart_failed",
                pool=self.pool,
                agent_id=agent_id,
                attempt=attempt,
                error=text,
            )
            self.core.restart_failed(i, f"restart {attempt} failed: {text}")
            self._on_change()
            return
        if self.core.restart_done(
            i, getattr(agent, "expertise", ()) or (), float(getattr(agent, "weight", 1.0))
        ):
            self.instances[i] = agent
            self._adopt(i, agent)
        self._on_change()
