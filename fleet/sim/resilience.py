"""Circuit breakers and retries in the simulator: what the pool's host cores did.

Breakers and retries are not modelled here: each simulated host's agents live in one
``fleet.policy.host.HostCore``, the live host's decision core, which feeds every
outcome (a timeout is a failure) to the agent's breaker with the live host's deferred
feeding, keeps agents whose breaker is open out of routing (ejection cap, panic mode,
half-open probes included) and decides every retry (``fleet.policy.retry``: retryable
errors, attempts, backoff, retry budget). This module logs the core's breaker events in
the simulation's event log and reports what the cores counted, summed over the pool's
hosts (each host has its own ejection cap and retry budget, as live).
"""

from __future__ import annotations

from collections import Counter
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
            out = self.pool.n_ejected
            self.max_out = max(self.max_out, out)
        elif event.kind is not BreakerEventKind.TRANSITION:
            self.sim.log_event(event.kind.value, pool=self.pool.name, reason=event.reason)


def resilience_report(pool: PoolRun) -> dict[str, Any]:
    """The breaker and retry figures of one pool, as its hosts' cores counted them."""
    cores = [h.core for h in pool.hosts]
    out: dict[str, Any] = {}
    first = cores[0]
    if first.breakers.enabled:
        snaps = [c.breakers.registry.snapshot() for c in cores]
        events: Counter[str] = Counter()
        for c in cores:
            events.update(c.breakers.log.counts)
        out["breakers"] = {
            "events": dict(sorted(events.items())),
            "ejected_max": pool.breaker_log.max_out,
            "ejected_at_end": sum(len(s["ejected"]) for s in snaps),  # type: ignore[arg-type]
            "max_ejected_allowed": sum(s["max_ejected"] for s in snaps),  # type: ignore[misc]
            "denied_trips": sum(s["denied_trips"] for s in snaps),  # type: ignore[misc]
            "panics": sum(s["panics"] for s in snaps),  # type: ignore[misc]
        }
    if first.retries.policy.spec.max_attempts > 1:
        final: Counter[str] = Counter()
        for c in cores:
            final.update(c.retries.final)
        out["retries"] = {
            "retried": sum(c.retries.retries for c in cores),
            "budget_denied": sum(c.retries.policy.budget.denied for c in cores),
            "final_verdicts": dict(sorted(final.items())),
        }
    return out
