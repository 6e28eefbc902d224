"""What changing a running fleet's spec takes (``fleet apply``): a pure comparison of the
running spec with the new one.

Changes apply in place when the actors that read them can be replaced without losing
what they hold: the hosts (a rolling replacement by Serve, each host draining its
batches like a scale-down), the controller and dispatcher (replaced the way a crash
restarts them: from the control store and the shards' leases), the budget actor (from
its store). So in place: pools added or removed, any field of an existing pool but its
capability (autoscaling bounds and rates, routing, breakers, agent class and kwargs,
resources), budgets, resilience, health, consensus, and the queue alerts.

Refused, with the field named: what decides where queued tasks and outcomes live or
how they are read back (the fleet's name and namespace, every other ``queues`` field:
shard count, storage, leases, Kafka intake; ``results``: ledger shards, retention, output
bound; ``resilience.max_deliveries``, read by the shards at start), an existing pool's
capability (its queued tasks are addressed by it), ``bulkheads`` (each queue shard
reads its share at start), and ``ingress`` (read by the ingress replicas at start:
redeploy the Serve config). To change those, ``fleet stop`` the fleet (its queue stays
in its storage directory) and ``fleet run`` the new spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.spec.fleet import FleetSpec

# Fields that cannot change in place, and why (a prefix covers what is below it).
_FIXED = {
    "name": "it names the fleet: run a new fleet instead",
    "namespace": "it holds the fleet's actors: run a new fleet instead",
    "queues": "queued tasks are stored and addressed by it",
    "results": "recorded outcomes are stored and read by it",
    "ingress": "the ingress replicas read it at start: redeploy the Serve config",
    "bulkheads": "each queue shard reads its share when it starts",
}
_IN_PLACE_UNDER_FIXED = ("queues.alerts",)  # read by the controller, which is replaced
# Fixed fields under sections that otherwise change in place.
_FIXED_LEAVES = {
    "resilience.max_deliveries": "each queue shard reads it when it starts",
}
# What the budget actor reads besides ``budgets``: a change replaces it too.
_BUDGET_READS = ("budgets", "resilience.task_timeout_s")
# Host init arguments besides the pool's own dict: a change rolls every pool's hosts.
_HOST_WIDE = ("resilience", "health", "budgets", "results", "observability")


@dataclass
class Plan:
    """What ``fleet apply`` will do, or ``refused``: why it will do nothing."""

    refused: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rolled: list[str] = field(default_factory=list)  # pools whose hosts are replaced
    changed: list[str] = field(default_factory=list)  # every changed field path
    budgets: bool = False  # the budget actor is replaced

    @property
    def noop(self) -> bool:
        return not self.changed


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaves; lists of non-dicts are leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    fa, fb = _flat(a, prefix), _flat(b, prefix)
    return sorted(
        k for k in fa.keys() | fb.keys() if fa.get(k, _MISSING) != fb.get(k, _MISSING)
    )


_MISSING = object()


def plan(old: FleetSpec, new: FleetSpec) -> Plan:
    """Compare the running spec ``old`` with ``new``."""
    p = Plan()
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    pools_a = {x["name"]: x for x in a.pop("pools")}
    pools_b = {x["name"]: x for x in b.pop("pools")}
    p.changed = _diff(a, b)
    for path in p.changed:
        if path in _FIXED_LEAVES:
            p.refused.append(f"{path}: cannot change in place ({_FIXED_LEAVES[path]})")
            continue
        top = next((f for f in _FIXED if path == f or path.startswith(f + ".")), None)
        if top is None or any(
            path == ok or path.startswith(ok + ".") for ok in _IN_PLACE_UNDER_FIXED
        ):
            continue
        p.refused.append(f"{path}: cannot change in place ({_FIXED[top]})")
    p.added = [n for n in pools_b if n not in pools_a]
    p.removed = [n for n in pools_a if n not in pools_b]
    host_wide = any(
        path == f or path.startswith(f + ".") for path in p.changed for f in _HOST_WIDE
    )
    for name in pools_a.keys() & pools_b.keys():
        diff = _diff(pools_a[name], pools_b[name], f"pools.{name}")
        p.changed += diff
        if f"pools.{name}.capability" in diff:
            p.refused.append(
                f"pools.{name}.capability: cannot change in place (its queued tasks are "
                "addressed by it): add a pool of the new capability instead"
            )
        if diff or host_wide:
            p.rolled.append(name)
    p.changed += [f"pools.{n}" for n in (*p.added, *p.removed)]
    p.rolled.sort()
    # The budget actor also reads the pools (their agents and estimates).
    p.budgets = any(
        path == f or path.startswith((f + ".", "pools."))
        for path in p.changed
        for f in _BUDGET_READS
    )
    return p
