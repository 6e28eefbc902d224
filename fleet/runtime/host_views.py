"""What an ``AgentHost`` tells others about itself: plain dicts built from its state.

- ``pool_stats``: compact counts for the dispatcher's per-pool status (rides on every
  batch reply, so it stays cheap);
- ``routing_stats``: load for fleet's Serve request router (plain reads of counters,
  safe from Serve's thread pool);
- ``health_report``: the agents' health for the controller's fleet cascade guard;
- ``host_stats``: load, outcomes, breakers, health and retries, with their newest events
  (``fleet status`` and the tests).

Each takes the host and only reads it (``host_stats`` first settles the breakers' owed
counts, as a read of them would); ``AgentHost`` keeps a method of the same name for each,
which is what Serve and the controller call. Times in events are the core's monotonic
clock; the views turn them into wall-clock ``at_unix_s``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fleet.policy.breaker import BreakerEvent
from fleet.policy.health import HealthEvent

if TYPE_CHECKING:
    from fleet.runtime.host import AgentHost

STATS_EVENTS = 100
REPORT_FAILURES = 10  # newest failures a host reports to the controller


def pool_stats(host: AgentHost) -> dict[str, Any]:
    """Compact per-host counts for the dispatcher's per-pool status."""
    core = host.core
    reg = core.breakers.registry
    return {
        "host": host.host_id,
        "agents": core.active,
        "ejected": len(reg.ejected),
        "max_ejected": reg.max_ejected,
        "panic": reg.panic,
        "retries": core.retries.retries,
        "retry_budget_denied": core.retries.policy.budget.denied,
        "completed": host.completed,
        "failed": host.failed,
    }


def routing_stats(host: AgentHost) -> dict[str, Any]:
    """Per-replica load for fleet's Serve request router."""
    core = host.core
    return {
        "in_flight": core.in_flight + len(core.slots.waiters),
        "capacity": core.active * core.c,
    }


def health_report(host: AgentHost) -> dict[str, Any]:
    """The host's agents' health for the controller (sent about once a second)."""
    core = host.core
    h = core.health
    mon = h.monitor
    failing, total = mon.failing_and_total()
    mono, wall = host.clock(), time.time()
    return {
        **h.gate.report(failing, total, mon.due_restarts()),
        "host": host.host_id,
        "counts": mon.counts(),
        "breaker_ejected": len(core.breakers.registry.ejected),
        "restarts": h.restarts,
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


def host_stats(host: AgentHost, events: int | None = STATS_EVENTS) -> dict[str, Any]:
    """Load, outcomes, breakers (snapshot and the last ``events`` breaker events, all
    kept ones if None), health and retries of the host.

    Settles the breakers' owed counts first: call it on the host's event loop."""
    core = host.core
    core.settle_breakers()  # so the breakers' counts are complete
    mono, wall = host.clock(), time.time()
    brk, h = core.breakers, core.health

    def last(log: Any) -> list[Any]:
        kept = list(log.events)
        return kept if events is None else (kept[-events:] if events > 0 else [])

    return {
        "host": host.host_id,
        "active_agents": core.active,
        "draining_agents": sum(1 for a in core.agents[core.active :] if a.in_flight),
        "in_flight": core.in_flight,
        "capacity": core.active * core.c,
        "waiting": len(core.slots.waiters),
        "budget_parked_slots": core.parking.slots,
        "completed": host.completed,
        "failed": host.failed,
        "abandoned": core.watch.n_abandoned,
        "retries": core.retries.retries,
        "final_failures": dict(core.retries.final),
        "retry_budget": core.retries.policy.budget.snapshot(),
        "router": host.pool.routing.router.value,
        "breakers": brk.registry.snapshot(),
        "breaker_event_counts": dict(brk.log.counts),
        "breaker_events": [_event_dict(e, mono, wall) for e in last(brk.log)],
        "health": {
            **h.monitor.snapshot(),
            "restarts": h.restarts,
            "out_of_service": sorted(core.agents[i].id for i in h.out),
            "event_counts": dict(h.events.counts),
            "events": [_health_event_dict(e, mono, wall) for e in last(h.events)],
        },
    }


def _event_dict(e: BreakerEvent, now_mono: float, now_unix: float) -> dict[str, Any]:
    d = asdict(e)
    d["kind"] = e.kind.value
    d["old"] = e.old.value if e.old is not None else None
    d["new"] = e.new.value if e.new is not None else None
    d["at_unix_s"] = now_unix - (now_mono - e.at_s)
    return d


def _health_event_dict(e: HealthEvent, now_mono: float, now_unix: float) -> dict[str, Any]:
    return {
        "at_unix_s": now_unix - (now_mono - e.at_s),
        "kind": e.kind.value,
        "subject": e.subject,
        "old": e.old,
        "new": e.new,
        "reason": e.reason,
    }
