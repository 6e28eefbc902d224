"""Hook points for policies plugged into the simulator (breakers, health, budgets, ...).

The engine drives the autoscaler, routers and batching of ``fleet.policy`` itself. Other
policies attach as ``Component`` objects: each overrides only the hooks it needs, and
the engine calls a hook only on components that override it, so an unused hook costs
nothing per task. A component acts on the simulation through the engine's public
methods: ``eject``/``readmit`` (take an agent out of service and back), ``kill``,
``preempt`` (cancel one run and requeue its task), ``schedule`` (a callback at a virtual
time), ``log_event`` and the pool state in ``sim.pools``. Time is ``now_s`` (virtual
seconds); randomness comes from ``sim.rng(name)``, a seeded stream of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.sim.engine import SimAgent, Simulation


# Agent states (``SimAgent.state``), which components read.
STARTING, ACTIVE, DRAINING, DEAD, STOPPED = range(5)


class Component:
    """Base class: every hook is a no-op."""

    name = "component"

    def attach(self, sim: Simulation) -> None:
        """Called once before the run starts, before the first agents come up."""

    def on_outcome(
        self,
        sim: Simulation,
        agent: SimAgent,
        tid: int,
        ok: bool,
        service_s: float,
        now_s: float,
    ) -> None:
        """An execution ended on ``agent`` (``ok`` False: failed or timed out)."""

    def on_agent_down(
        self, sim: Simulation, agent: SimAgent, reason: str, now_s: float
    ) -> None:
        """``agent`` died (``reason``: kill, crash, ...); its work is already re-queued.
        A draining agent that dies does not restart: its state is already STOPPED."""

    def on_agent_up(self, sim: Simulation, agent: SimAgent, now_s: float) -> None:
        """``agent`` started serving (new, or restarted)."""

    def on_agent_gone(self, sim: Simulation, agent: SimAgent, now_s: float) -> None:
        """``agent`` left the pool on purpose (drained after a scale-down)."""

    def restart_delay_s(
        self, sim: Simulation, agent: SimAgent, default_s: float, now_s: float
    ) -> float | None:
        """Delay before a dead agent restarts; None leaves it to the next component
        (and finally to the scenario's ``restart_delay_s``)."""
        return None

    def restart_gate_s(self, sim: Simulation, agent: SimAgent, now_s: float) -> float | None:
        """A dead agent's restart is due: None lets it go (or ``sim.retire`` it), a
        number postpones it by that many seconds (a throttle)."""
        return None

    def on_tick(self, sim: Simulation, now_s: float) -> None:
        """Every ``sample_interval_s``."""

    def report(self) -> dict[str, Any]:
        """Figures for the report, under ``components.<name>``."""
        return {}


def overrides(component: Component, hook: str) -> bool:
    return getattr(type(component), hook) is not getattr(Component, hook)


# Which of fleet's policies the simulator drives, and which wait at a seam (the report's
# ``seams``). Autoscaling, routing, batching, breakers and retries are driven by the
# engine, the health policy's restarts by a default component (``fleet.sim.health``),
# overload and compute preemption by ``fleet.sim.overload`` and ``fleet.sim.preemption``;
# budgets plug in through a ``Component`` (see this module's docstring).
POLICY_SEAMS: dict[str, str] = {
    "fleet.policy.autoscaling": "driven: every control interval",
    "fleet.policy.routing": "driven: every task",
    "fleet.policy.batching": "driven: every dispatcher call",
    "fleet.policy.breaker": "driven: every outcome (fleet.sim.resilience)",
    "fleet.policy.retry": "driven: every failure (fleet.sim.resilience)",
    "fleet.policy.health": (
        "driven: HealthMonitor's restart backoff, ejection and cascade guard on every "
        "death (fleet.sim.health); its detection pass (heartbeats, hung tasks, error "
        "rates) not simulated"
    ),
    "fleet.policy.allocation": "seam: budget allocation; plug in as a Component",
    "fleet.policy.budget": "seam: budget enforcement and preemption; plug in as a Component",
    "fleet.policy.disciplines": (
        "FIFO, or the priority discipline when the workload gives tasks priorities "
        "(fleet.sim.overload.PriorityQueue, the shard's order); the deadline and "
        "utility disciplines are not simulated"
    ),
    "fleet.policy.admission": (
        "driven: the pool's load every control interval, a decision every arrival "
        "(fleet.sim.overload)"
    ),
    "fleet.policy.degrade": "driven: every control interval (fleet.sim.overload)",
    "fleet.policy.bulkhead": (
        "driven: pool and tenant limits at every arrival and dispatch, held-back tasks "
        "every control interval (fleet.sim.overload)"
    ),
    "fleet.policy.preemption": (
        "driven: every check period of a pool with preemption enabled, while it is full "
        "(fleet.sim.preemption)"
    ),
}
