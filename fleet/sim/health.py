"""Restart policy in the simulator: fleet's restart backoff and cascade guard.

A ``Component`` (attached by default when ``fleet.policy.health`` is present) that
applies the fleet spec's ``health`` section to dead agents, with the real policy code:

* each death counts as a failure of that agent; the ``n``-th consecutive one waits
  ``backoff_s(spec.restart, n, rng)`` before the restart begins (on top of the
  scenario's ``restart_delay_s``, the time the process itself takes), and an agent that
  stayed up for ``reset_after_s`` starts again from the first step;
* after ``eject_after_failures`` consecutive failures the agent is not restarted: it is
  retired, and the autoscaler's next decision replaces it with a fresh agent;
* every restart that is due asks the fleet-wide ``CascadeGuard`` (fed the share of the
  fleet's agents that are dead), which throttles restarts when too many fail at once;
  a restart it refuses is asked again a moment later. Restarts granted while the guard
  is not closed are its probes: one that stays up ``probe_healthy_s`` succeeds, one
  that dies before fails.

Heartbeats, hung-task and error-rate detection of ``HealthMonitor`` are not simulated
(chaos and crash deaths stand in for detected failures; timeouts bound hung tasks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.policy.backoff import backoff_s
from fleet.policy.health import CascadeGuard, GuardState, HealthEvent, HealthEventLog
from fleet.sim.components import Component

if TYPE_CHECKING:
    from fleet.sim.engine import SimAgent, Simulation

RETRY_GATE_FRACTION = 0.1  # a refused restart asks again after this share of interval_s


class HealthRestarts(Component):
    """Restart backoff and the cascade guard of ``fleet.policy.health`` (see module doc)."""

    name = "health"

    def __init__(self, spec: Any):
        self.spec = spec
        self.log = HealthEventLog()
        self.guard = CascadeGuard(spec.cascade, [self.log, self], name="fleet:cascade")
        self.sim: Simulation | None = None
        self.failures: dict[str, int] = {}  # consecutive failures per agent
        self.up_since: dict[str, float] = {}
        self.probes: dict[str, tuple[int, float]] = {}  # agent id -> (gen, up since)
        self.backoffs: list[float] = []
        self.retired = 0
        self.gate_waits = 0

    def attach(self, sim: Simulation) -> None:
        self.sim = sim
        self.rng = sim.rng("health")

    def on_health_event(self, event: HealthEvent) -> None:
        if self.sim is not None:
            kind = event.kind.value if event.new is None else f"{event.kind.value}_{event.new}"
            self.sim.log_event(f"health_{kind}", subject=event.subject, reason=event.reason)

    def _observe(self, sim: Simulation, now_s: float) -> None:
        failing = sum(len(p.dead) for p in sim.pools)
        total = sum(len(p.active) + len(p.starting) + len(p.dead) for p in sim.pools)
        self.guard.observe(failing, total, now_s)

    def on_agent_up(self, sim: Simulation, agent: SimAgent, now_s: float) -> None:
        self.up_since[agent.id] = now_s
        if self.guard.state is not GuardState.CLOSED and agent.id in self.probes:
            self.probes[agent.id] = (agent.gen, now_s)
            gen = agent.gen

            def check(t: float, a: SimAgent = agent) -> None:
                if self.probes.get(a.id, (None,))[0] == gen and a.gen == gen:
                    del self.probes[a.id]
                    self.guard.probe_succeeded(t)
                    self._observe(sim, t)

            sim.schedule(now_s + self.spec.cascade.probe_healthy_s, check)
        else:
            self.probes.pop(agent.id, None)

    def on_agent_down(
        self, sim: Simulation, agent: SimAgent, reason: str, now_s: float
    ) -> None:
        up = self.up_since.pop(agent.id, None)
        n = self.failures.get(agent.id, 0)
        if up is not None and now_s - up >= self.spec.restart.reset_after_s:
            n = 0  # it had been healthy long enough: the backoff starts over
        self.failures[agent.id] = n + 1
        if self.probes.pop(agent.id, None) is not None:
            self.guard.probe_failed(now_s)
        self._observe(sim, now_s)

    def restart_delay_s(
        self, sim: Simulation, agent: SimAgent, default_s: float, now_s: float
    ) -> float | None:
        n = self.failures.get(agent.id, 1)
        limit = self.spec.restart.eject_after_failures
        if limit is not None and n >= limit:
            return None  # retired below, in restart_gate_s
        backoff = backoff_s(self.spec.restart, n, self.rng)
        self.backoffs.append(backoff)
        return default_s + backoff

    def restart_gate_s(self, sim: Simulation, agent: SimAgent, now_s: float) -> float | None:
        limit = self.spec.restart.eject_after_failures
        if limit is not None and self.failures.get(agent.id, 0) >= limit:
            sim.retire(agent, now_s)
            self.retired += 1
            self.failures.pop(agent.id, None)
            return None
        self._observe(sim, now_s)
        if self.guard.try_restart(now_s):
            if self.guard.state is not GuardState.CLOSED:
                self.probes[agent.id] = (agent.gen, now_s)
            return None
        self.gate_waits += 1
        return self.spec.cascade.interval_s * RETRY_GATE_FRACTION

    def report(self) -> dict[str, Any]:
        n = len(self.backoffs)
        return {
            "cascade": self.guard.snapshot(self.sim.now if self.sim else 0.0),
            "events": dict(sorted(self.log.counts.items())),
            "restart_backoff_s": {
                "n": n,
                "mean": sum(self.backoffs) / n if n else None,
                "max": max(self.backoffs) if n else None,
            },
            "restarts_refused": self.gate_waits,
            "retired": self.retired,
        }
