"""Circuit breakers and retries in the simulator: what the pool's host core did.

Breakers and retries are not modelled here: each simulated pool's agents live in one
``fleet.policy.host.HostCore``, the live host's decision core, which feeds every
outcome (a timeout is a failure) to the agent's breaker with the live host's deferred
feeding, keeps agents whose breaker is open out of routing (ejection cap, panic mode,
half-open probes included) and decides every retry (``fleet.policy.retry``: retryable
errors, attempts, backoff, retry budget). This module logs the core's breaker events in
the simulation's event log and reports what the core counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.policy.breaker import BreakerEvent
from fleet.policy.breaker import EventKind as BreakerEventKind

if TYPE_CHECKING:
    from fleet.sim.engine import PoolRun, Simulation


class SimBreakerLog:
    """A breaker listener of a pool's core: logs each event in the simulation and keeps
    the most agents ejected at once."""

    def __init__(self, sim: Simulation, pool: PoolRun):
        self.sim = sim
        self.pool = pool
        self.max_out = 0

    def on_breaker_event(self, event: BreakerEvent) -> None:
        if event.kind is BreakerEventKind.TRANSITION and event.new is not None:
            self.sim.log_event(
                f"breaker_{event.new.value}",
                pool=self.pool.name,
                breaker=event.name,
                reason=event.reason,
            )
            out = len(self.pool.core.breakers.registry.ejected)
            self.max_out = max(self.max_out, out)
        elif event.kind is not BreakerEventKind.TRANSITION:
            self.sim.log_event(event.kind.value, pool=self.pool.name, reason=event.reason)


def resilience_report(pool: PoolRun) -> dict[str, Any]:
    """The breaker and retry figures of one pool, as its host core counted them."""
    core = pool.core
    out: dict[str, Any] = {}
    if core.breakers.enabled:
        snap = core.breakers.registry.snapshot()
        out["breakers"] = {
            "events": dict(sorted(core.breakers.log.counts.items())),
            "ejected_max": pool.breaker_log.max_out,
            "ejected_at_end": len(snap["ejected"]),  # type: ignore[arg-type]
            "max_ejected_allowed": snap["max_ejected"],
            "denied_trips": snap["denied_trips"],
            "panics": snap["panics"],
        }
    r = core.retries
    if r.policy.spec.max_attempts > 1:
        out["retries"] = {
            "retried": r.retries,
            "budget_denied": r.policy.budget.denied,
            "final_verdicts": dict(sorted(r.final.items())),
        }
    return out
