"""Health of a host's logical agents: heartbeats, failure detection, in-host restarts.

The host's side of ``fleet.policy.health``, mixed into ``AgentHost`` (it reads the
host's slots and routable set and keeps its methods apart from the per-task path).
Each host runs one ``HealthMonitor`` over its own agents; the restart decisions go
through a ``FleetGate``, whose verdicts come from the fleet-wide ``CascadeGuard`` in the
controller (``fleet.runtime.fleet_health``), answered on the host's periodic
autoscaling report (``AgentHost.record_autoscaling_stats``): no per-task call.

Per task (O(1), a few hundred nanoseconds): the host notes which agent runs each
asyncio task (``_on_agent``, for hung-task attribution) and tallies successes per agent
(``_health_ok``). A failure goes to the monitor at once: if it trips the error rate,
the agent leaves the routable set before it can take another task. Everything else
runs in ``_health_loop`` every ``HEALTH_TICK_S`` (or half a heartbeat interval):

- tallied successes go to the monitor in bulk (they only dilute the error rate, so
  handing them over late never hides a failure);
- heartbeats, every ``heartbeat_interval_s``: an agent class that overrides
  ``Agent.heartbeat`` is asked (an answer within the interval is a heartbeat; an
  exception or silence is not); other agents live as long as the host's loop does, so
  the host beats for them;
- hung tasks: a task still on its agent ``hung_task_grace_s`` after the watchdog
  cancelled it at ``task_timeout_s`` ignored the cancel: its agent is hung;
- the monitor's tick (missed heartbeats, backoff, restart permits); its actions are
  applied: REMOVE/EJECT take the agent out of the routable set, ADMIT puts it back,
  RESTART builds a new instance and runs ``setup()`` again.

A restart orphans the old instance's hung tasks: their slots are freed at once and
their late end neither releases a slot nor feeds the breaker (the slot was given back).
"""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from typing import TYPE_CHECKING, Any

from fleet.agent import Agent
from fleet.policy.health import (
    ActionKind,
    AgentState,
    FailureReason,
    FleetGate,
    GuardState,
    HealthAction,
    HealthEvent,
    HealthEventLog,
    HealthMonitor,
)
from fleet.spec.health import HealthSpec

if TYPE_CHECKING:
    from fleet.runtime.host import AgentHost

HEALTH_TICK_S = 0.5
HEALTH_EVENTS_KEPT = 1_000
REPORT_FAILURES = 10  # newest failures a host reports to the controller
# The controller answers every metrics interval (1 s); a verdict older than this means
# it is unreachable, and the host's own guard decides alone (see FleetGate).
GATE_STALE_S = 5.0
ORPHAN = -1  # _on_agent entry of a task whose agent was restarted under it


def _agent_index(agent_id: str) -> int:
    return int(agent_id.rsplit("/", 1)[1])


def _custom_heartbeat(agent: Agent) -> bool:
    return type(agent).heartbeat is not Agent.heartbeat


class AgentHealthMixin:
    """Heartbeats, failure detection and in-host restarts for ``AgentHost``."""

    def _init_health(self: AgentHost, spec: dict[str, Any] | None) -> None:
        self.health_spec = HealthSpec.model_validate(spec or {})
        self.health_events = HealthEventLog(size=HEALTH_EVENTS_KEPT)
        self._gate = FleetGate(self.health_spec.cascade, GATE_STALE_S, name=self.host_id)
        self._health = HealthMonitor(
            self.health_spec,
            time.monotonic,
            random.Random(),
            [self.health_events],
            name=self.host_id,
            guard=self._gate,
        )
        n = self.pool.agents_per_host
        self._health_ok = [0] * n  # successes not yet handed to the monitor
        self._health_out: set[int] = set()  # agents health holds out of service
        self._health_members: set[int] = set()
        self._on_agent: dict[asyncio.Task[Any], tuple[int, str]] = {}  # task: (agent, item)
        self._pinging: set[int] = set()
        self._restarting: set[asyncio.Task[None]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._next_beat_s = 0.0
        self._last_tick_s: float | None = None
        # At least twice per heartbeat interval, so a beat is never a whole tick late.
        self._tick_s = min(HEALTH_TICK_S, self.health_spec.heartbeat_interval_s / 2)
        self._all_out_since: float | None = None
        self.restarts = 0

    # -- membership -------------------------------------------------------------------
    def _health_sync(self: AgentHost) -> None:
        """Follow ``set_active``: new active agents join (in service), drained ones leave."""
        mon, ids = self._health, self._agent_ids
        for i in range(len(ids)):
            if i < self._active and i not in self._health_members:
                self._health_members.add(i)
                self._health_ok[i] = 0
                mon.add_agent(ids[i], self.pool.name)
                mon.heartbeat(ids[i])  # a slot that is about to be used: in service
            elif i >= self._active and i in self._health_members:
                self._health_members.discard(i)
                mon.remove_agent(ids[i])
                if i in self._health_out:
                    self._health_out.discard(i)
                    self._agents[i] = None  # failed: a fresh instance if it comes back
        mon.take_actions()  # the ADMITs of new agents: they are routable already

    # -- the hot path's hand-off ----------------------------------------------------
    def _health_failed(self: AgentHost, i: int) -> None:
        """A task failed on agent i: the monitor hears it now (error-rate rule)."""
        if i not in self._health_members:
            return
        ok, self._health_ok[i] = self._health_ok[i], 0
        if self._health.task_outcomes(self._agent_ids[i], ok, 1):
            self._apply_health(self._health.take_actions())

    # -- the loop -----------------------------------------------------------------------
    def _ensure_health_loop(self: AgentHost) -> None:
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self: AgentHost) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            self._health_tick()

    def _health_tick(self: AgentHost) -> None:
        now = time.monotonic()
        mon, ids = self._health, self._agent_ids
        for i in range(self._active):
            if self._health_ok[i]:
                ok, self._health_ok[i] = self._health_ok[i], 0
                mon.task_outcomes(ids[i], ok, 0)
        # A loop late by more than a heartbeat interval stalled as a whole (the host was
        # starved): every agent looks silent. Ask them now and judge next tick, so
        # that the host's own stall is not blamed on its agents.
        stalled = (
            self._last_tick_s is not None
            and now - self._last_tick_s > self._tick_s + self.health_spec.heartbeat_interval_s
        )
        self._last_tick_s = now
        if now >= self._next_beat_s or stalled:
            self._next_beat_s = now + self.health_spec.heartbeat_interval_s
            self._beat()
        if stalled:
            return
        self._find_hung(now)
        self._apply_health(mon.tick())
        if self._active and not any(self._is_in_service(i) for i in range(self._active)):
            self._all_out_since = self._all_out_since or now
        else:
            self._all_out_since = None

    def _is_in_service(self: AgentHost, i: int) -> bool:
        return i in self._health_members and i not in self._health_out

    def _beat(self: AgentHost) -> None:
        mon, ids = self._health, self._agent_ids
        for i in range(self._active):
            if i not in self._health_members:
                continue
            state = mon.state(ids[i])
            if state in (AgentState.RESTARTING, AgentState.EJECTED):
                continue  # a restart reports by itself; an ejected agent is out for good
            agent = self._agents[i]
            if agent is None or not _custom_heartbeat(agent):
                mon.heartbeat(ids[i])
            elif i not in self._pinging:
                self._pinging.add(i)
                asyncio.get_running_loop().create_task(self._ping(i, agent))

    async def _ping(self: AgentHost, i: int, agent: Agent) -> None:
        """Ask an agent for its heartbeat; no answer within the interval is none."""
        try:
            await asyncio.wait_for(agent.heartbeat(), self.health_spec.heartbeat_interval_s)
        except Exception:
            return  # missed: the monitor notices when heartbeat_timeout_s has passed
        finally:
            self._pinging.discard(i)
        if self._agents[i] is agent and i in self._health_members:
            self._health.heartbeat(self._agent_ids[i])
            self._apply_health(self._health.take_actions())

    def _find_hung(self: AgentHost, now: float) -> None:
        """Tasks past ``task_timeout_s`` + grace that are still running ignored the
        watchdog's cancel: their agent is hung. O(tasks in flight)."""
        limit = self.resilience.task_timeout_s
        cutoff = limit + self.health_spec.hung_task_grace_s
        mon = self._health
        for t, t0 in self._running.items():
            if now - t0 <= cutoff or t.done():
                continue
            i, item_id = self._on_agent.get(t, (ORPHAN, ""))
            if i == ORPHAN or i not in self._health_members:
                continue
            failure = mon.detector.hung(item_id, t0, limit, now)
            if failure is not None and mon.in_service(self._agent_ids[i]):
                mon.report_failure(self._agent_ids[i], failure.detail, FailureReason.HUNG_TASK)

    # -- actions --------------------------------------------------------------------
    def _apply_health(self: AgentHost, actions: list[HealthAction]) -> None:
        changed = False
        for a in actions:
            i = _agent_index(a.agent_id)
            if a.kind in (ActionKind.REMOVE, ActionKind.EJECT):
                if i not in self._health_out:
                    self._health_out.add(i)
                    changed = True
            elif a.kind is ActionKind.ADMIT:
                if i in self._health_out:
                    self._health_out.discard(i)
                    changed = True
            elif a.kind is ActionKind.RESTART:
                self.restarts += 1
                t = asyncio.get_running_loop().create_task(self._restart(i, a.attempt))
                self._restarting.add(t)
                t.add_done_callback(self._restarting.discard)
        if changed:
            self._refresh()
            self._wake()

    async def _restart(self: AgentHost, i: int, attempt: int) -> None:
        """A new instance of agent i, set up again; in service once it reports."""
        agent_id = self._agent_ids[i]
        mon = self._health
        self._orphan(i)
        self._agents[i] = None
        self._lat[i] = 0.0  # the router's view of the old instance does not carry over
        self._router.forget(agent_id)
        try:
            agent = self._new_agent(i)
            await asyncio.wait_for(agent.setup(), self.health_spec.startup_timeout_s)
            if _custom_heartbeat(agent):
                await asyncio.wait_for(
                    agent.heartbeat(), self.health_spec.heartbeat_interval_s
                )
        except Exception as exc:
            text = "".join(traceback.format_exception_only(exc)).strip()[:500]
            mon.report_failure(
                agent_id, f"restart {attempt} failed: {text}", FailureReason.CRASHED
            )
            self._apply_health(mon.take_actions())
            return
        if i not in self._health_members or mon.state(agent_id) is not AgentState.RESTARTING:
            return  # drained (scaled down) while it restarted
        self._agents[i] = agent
        self._expertise[i] = frozenset(getattr(agent, "expertise", ()) or ())
        self._weight[i] = float(getattr(agent, "weight", 1.0))
        mon.heartbeat(agent_id)
        self._apply_health(mon.take_actions())

    def _orphan(self: AgentHost, i: int) -> None:
        """Free the slots of agent i's tasks that outlived their limit (hung on the old
        instance): the restarted agent starts with all its slots."""
        limit = self.resilience.task_timeout_s
        now = time.monotonic()
        for t, (j, item_id) in list(self._on_agent.items()):
            if j == i and not t.done() and now - self._running.get(t, now) > limit:
                self._on_agent[t] = (ORPHAN, item_id)
                self._busy[i] -= 1

    # -- signals out ----------------------------------------------------------------
    def health_report(self: AgentHost) -> dict[str, Any]:
        """This host's agents' health for the controller (sent about once a second)."""
        mon = self._health
        failing, total = mon.failing_and_total()
        mono, wall = time.monotonic(), time.time()
        return {
            **self._gate.report(failing, total, mon.due_restarts()),
            "host": self.host_id,
            "counts": mon.counts(),
            "breaker_ejected": len(self._breakers.ejected),
            "restarts": self.restarts,
            "failures": dict(mon.failure_counts),
            "last_failures": [
                {
                    "at_unix_s": wall - (mono - f.at_s),
                    "agent_id": f.agent_id,
                    "reason": f.reason,
                    "detail": f.detail,
                }
                for f in list(mon.failures)[-REPORT_FAILURES:]
            ],
        }

    def apply_health_verdict(self: AgentHost, verdict: dict[str, Any]) -> None:
        """The fleet guard's answer to ``health_report``: its state and our permits."""
        self._gate.apply(verdict["state"], int(verdict.get("permits", 0)), time.monotonic())
        if verdict.get("permits"):
            self._apply_health(self._health.tick())  # use them now, before they go stale

    def health_problem(self: AgentHost) -> str | None:
        """Why Serve should replace this host, or None (see ``check_health``)."""
        t = self._health_task
        if t is not None and t.done():
            exc = None if t.cancelled() else t.exception()
            return f"the health loop stopped: {exc!r}"
        since = self._all_out_since
        if since is None or any(self._is_in_service(i) for i in range(self._active)):
            return None  # (the tick that noticed a recovery may not have run yet)
        limit = self.health_spec.startup_timeout_s
        if time.monotonic() - since > limit and self._gate.state is GuardState.CLOSED:
            return (
                f"no agent in service for more than startup_timeout_s={limit:g}s "
                "and in-host restarts did not bring one back"
            )
        return None

    def health_stats(self: AgentHost, events: int | None) -> dict[str, Any]:
        mono, wall = time.monotonic(), time.time()
        kept = list(self.health_events.events)
        if events is not None:
            kept = kept[-events:] if events > 0 else []
        return {
            **self._health.snapshot(),
            "restarts": self.restarts,
            "out_of_service": sorted(self._agent_ids[i] for i in self._health_out),
            "event_counts": dict(self.health_events.counts),
            "events": [_event_dict(e, mono, wall) for e in kept],
        }


def _event_dict(e: HealthEvent, now_mono: float, now_unix: float) -> dict[str, Any]:
    return {
        "at_unix_s": now_unix - (now_mono - e.at_s),
        "kind": e.kind.value,
        "subject": e.subject,
        "old": e.old,
        "new": e.new,
        "reason": e.reason,
    }


__all__ = ["AgentHealthMixin", "HEALTH_TICK_S"]
