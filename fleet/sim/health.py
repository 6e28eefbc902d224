"""Restart policy in the simulator: fleet's ``HealthMonitor`` and cascade guard, driven
by agent deaths.

A ``Component`` (attached by default) that runs the fleet spec's ``health`` section on
one ``fleet.policy.health.HealthMonitor`` for the whole simulated fleet, the object
each live host runs, with the fleet-wide ``CascadeGuard`` the live controller runs. The
rules (consecutive failures and their reset after ``reset_after_s``, the restart
backoff, ``eject_after_failures``, the guard's permits and probes) are the monitor's;
this module only turns simulator events into its signals:

* an agent that starts serving reports a heartbeat (the monitor admits it);
* a death is ``report_failure(CRASHED)``: the monitor takes the agent out of service
  and either ejects it (the simulator retires it, and the autoscaler's next decision
  starts a fresh agent) or sets its restart time after the backoff;
* the restart event comes ``restart_delay_s`` (the scenario's detection and
  scheduling time) after that restart time (or when a component ahead of this one
  says), and asks ``HealthMonitor.restart``: the guard grants a permit or the agent
  asks again a moment later;
* a probe (a restart granted while the guard is not closed) is settled
  ``probe_healthy_s`` after the agent is back; an agent that leaves the pool on purpose
  (scaled down) is removed from the monitor.

The monitor's detection pass (``tick``: missed heartbeats, hung tasks, error rates) is
not run: it is O(agents) per tick, and deaths, chaos and task timeouts stand in for
what it detects. Each call made here is O(1) (``settle_probes``: O(probes)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.policy.health import (
    ActionKind,
    AgentState,
    FailureReason,
    HealthEvent,
    HealthEventLog,
    HealthMonitor,
)
from fleet.sim.components import DEAD, Component

if TYPE_CHECKING:
    from fleet.sim.engine import SimAgent, Simulation

RETRY_GATE_FRACTION = 0.1  # a refused restart asks again after this share of interval_s


class HealthRestarts(Component):
    """Deaths, restarts and the cascade guard through ``HealthMonitor`` (see module doc)."""

    name = "health"

    def __init__(self, spec: Any):
        self.spec = spec
        self.log = HealthEventLog()
        self.sim: Simulation | None = None
        self.monitor: HealthMonitor | None = None
        self.backoffs: list[float] = []
        self.retired = 0
        self.gate_waits = 0

    def attach(self, sim: Simulation) -> None:
        self.sim = sim
        self.monitor = HealthMonitor(
            self.spec, lambda: sim.now, sim.rng("health"), [self.log, self], name="fleet"
        )

    def on_health_event(self, event: HealthEvent) -> None:
        if self.sim is not None:
            kind = event.kind.value if event.new is None else f"{event.kind.value}_{event.new}"
            self.sim.log_event(f"health_{kind}", subject=event.subject, reason=event.reason)

    def on_agent_up(self, sim: Simulation, agent: SimAgent, now_s: float) -> None:
        mon = self.monitor
        assert mon is not None
        mon.heartbeat(agent.id, agent.pool.name)  # admits it (new, or restarted)
        mon.take_actions()  # ADMIT: the engine already put it in service
        if mon.agent(agent.id).probe:
            sim.schedule(now_s + self.spec.cascade.probe_healthy_s, self._settle)

    def _settle(self, now_s: float) -> None:
        assert self.monitor is not None
        self.monitor.settle_probes()
        self.monitor.observe_guard()

    def on_agent_down(
        self, sim: Simulation, agent: SimAgent, reason: str, now_s: float
    ) -> None:
        mon = self.monitor
        assert mon is not None
        if agent.state != DEAD:  # it was draining: it leaves the pool, no restart
            mon.remove_agent(agent.id)
            mon.observe_guard()
            return
        mon.report_failure(agent.id, reason, FailureReason.CRASHED)
        ejected = any(a.kind is ActionKind.EJECT for a in mon.take_actions())
        mon.observe_guard()
        if ejected:
            mon.remove_agent(agent.id)
            sim.retire(agent, now_s)
            self.retired += 1

    def restart_delay_s(
        self, sim: Simulation, agent: SimAgent, default_s: float, now_s: float
    ) -> float | None:
        assert self.monitor is not None
        due = self.monitor.agent(agent.id).next_restart_s
        backoff = 0.0 if due is None else due - now_s
        self.backoffs.append(backoff)
        return default_s + backoff

    def restart_gate_s(self, sim: Simulation, agent: SimAgent, now_s: float) -> float | None:
        mon = self.monitor
        assert mon is not None
        mon.observe_guard()
        # The restart event's time is the backoff's (restart_delay_s), or the delay a
        # component ahead of this one chose: either way it is due now.
        if mon.restart(agent.id, ignore_backoff=True):
            mon.take_actions()  # RESTART: the engine starts the agent's new instance
            return None
        if mon.state(agent.id) is not AgentState.UNHEALTHY:
            return None  # not the monitor's to hold
        self.gate_waits += 1
        return self.spec.cascade.interval_s * RETRY_GATE_FRACTION

    def on_agent_gone(self, sim: Simulation, agent: SimAgent, now_s: float) -> None:
        """A drained agent left the pool (scaled down)."""
        assert self.monitor is not None
        self.monitor.remove_agent(agent.id)

    def report(self) -> dict[str, Any]:
        n = len(self.backoffs)
        mon = self.monitor
        now = self.sim.now if self.sim else 0.0
        return {
            "cascade": mon.guard.snapshot(now) if mon else {},
            "events": dict(sorted(self.log.counts.items())),
            "restart_backoff_s": {
                "n": n,
                "mean": sum(self.backoffs) / n if n else None,
                "max": max(self.backoffs) if n else None,
            },
            "restarts_refused": self.gate_waits,
            "retired": self.retired,
        }
