"""The controller's metrics: the fleet's levels, set every control tick.

Gauges (``fleet.observability.metrics.CATALOG``) for queue shards (depth, leased,
oldest age), pools (agents by health state, desired agents, hosts, in flight, breaker
ejections and their cap), the cascade guard, the control actors' restart counts,
in-process alerts and budgets; and the queue shards' counters, advanced by the growth of
each shard's totals. Everything goes to Ray's metrics agent through a ``Sink``.

Shard totals restart from zero with a restarted shard (its new totals count as growth).
A restarted controller does not know what its predecessor exported, so it takes the
totals it first sees as its baseline (``resumed``): the predecessor's series keeps what
it counted, and counting twice is avoided at the price of the moves in the one tick
between its last export and its death.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fleet.observability.metrics import (
    NO_TENANT,
    OTHER_TENANT,
    Sink,
    TenantLabels,
    for_fleet,
)
from fleet.policy.health import AgentState
from fleet.policy.queue_alerts import ActiveAlert
from fleet.spec.fleet import FleetSpec

_QUEUE_COUNTERS = {
    "enqueued_total": "fleet_queue_enqueued_total",
    "acked_total": "fleet_queue_acked_total",
    "redelivered_total": "fleet_queue_redeliveries_total",
    "expired_total": "fleet_queue_lease_expiries_total",
}
_QUEUE_GAUGES = {
    "depth": "fleet_queue_depth",
    "leased": "fleet_queue_leased",
    "oldest_age_s": "fleet_queue_oldest_age_seconds",
}
_GUARD_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


class ControlMetrics:
    def __init__(self, spec: FleetSpec, sink: Sink, resumed: bool):
        self.spec = spec
        self.sink = for_fleet(sink, spec.name)
        self._resumed = resumed
        self._last: dict[tuple[str, int], dict[str, int]] = {}
        self._alerts: set[tuple[str, str, str]] = set()
        self._tenants = TenantLabels.of_spec(spec).known

    # -- queues -------------------------------------------------------------------------
    def shard(self, queue: str, shard: int, stats: Mapping[str, Any]) -> None:
        tags = {"queue": queue, "shard": str(shard)}
        last = self._last.get((queue, shard))
        if last is None:
            last = self._last[(queue, shard)] = (
                {k: int(stats.get(k, 0)) for k in _QUEUE_COUNTERS} if self._resumed else {}
            )
        for key, name in _QUEUE_COUNTERS.items():
            total = int(stats.get(key, 0))
            prev = last.get(key, 0)
            inc = total - prev if total >= prev else total  # lower: the shard restarted
            if inc > 0:
                self.sink.inc(name, inc, tags)
            last[key] = total
        for key, name in _QUEUE_GAUGES.items():
            self.sink.set(name, float(stats.get(key, 0.0)), tags)

    # -- pools and health -----------------------------------------------------------------
    def pool(
        self,
        pool: str,
        desired_agents: int,
        dispatcher: Mapping[str, Any],
        health: Mapping[str, Any],
    ) -> None:
        tags = {"pool": pool}
        s = self.sink
        s.set("fleet_agents_desired", desired_agents, tags)
        s.set("fleet_in_flight", float(dispatcher.get("in_flight", 0)), tags)
        s.set("fleet_breaker_ejected_agents", float(dispatcher.get("ejected_agents", 0)), tags)
        s.set(
            "fleet_breaker_max_ejected_agents",
            float(dispatcher.get("max_ejected_agents", 0)),
            tags,
        )
        s.set("fleet_hosts", float(health.get("hosts_reporting", 0)), tags)
        for st in (*(a.value for a in AgentState), "breaker_ejected"):
            s.set("fleet_agents", float(health.get(st, 0)), {"pool": pool, "state": st})

    def shed(self, pool: str, cls: str, reason: str, tenant: str, n: int) -> None:
        """Tasks admission control refused at an entry point (reported in bulk)."""
        self._refused("fleet_tasks_shed_total", pool, cls, tenant, n, reason=reason)

    def bulkhead_refused(self, pool: str, cls: str, tenant: str, n: int) -> None:
        """Tasks refused at their tenant's queued bulkhead (reported in bulk)."""
        self._refused("fleet_tasks_bulkhead_refused_total", pool, cls, tenant, n)

    def degraded(self, pool: str, cls: str, tenant: str, n: int) -> None:
        """Tasks sent to the pool's fallback by its degrade rule (reported in bulk)."""
        self._refused("fleet_tasks_degraded_total", pool, cls, tenant, n)

    def _refused(
        self, name: str, pool: str, cls: str, tenant: str, n: int, **labels: str
    ) -> None:
        """Count ``n`` of what entry points reported, by pool, class and tenant."""
        if tenant not in self._tenants and tenant not in (NO_TENANT, OTHER_TENANT):
            tenant = OTHER_TENANT  # labels from entry points stay bounded
        self.sink.inc(
            name, n, {"pool": pool, "priority_class": cls, **labels, "tenant": tenant}
        )

    def admission(self, pool: str, load: Any) -> None:
        """The drain rate admission control predicts waits with (tasks/s the pool can
        complete; 0 until measured)."""
        drain = load.drain_per_s or 0.0
        self.sink.set("fleet_admission_drain_per_second", drain, {"pool": pool})
        self.sink.set("fleet_pool_degraded", 1.0 if load.degraded else 0.0, {"pool": pool})

    def guard(self, state: str) -> None:
        self.sink.set("fleet_cascade_guard_state", _GUARD_LEVEL.get(state, 0), {})

    def control_actors(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        for name, st in states.items():
            n = st.get("restarts")
            if isinstance(n, int):
                self.sink.set("fleet_control_actor_restarts", n, {"actor": name})

    def alerts(self, active: Iterable[ActiveAlert]) -> None:
        """1 for each firing alert; one 0 for each that cleared (then Ray drops it)."""
        now = {(a.rule, a.subject, a.severity) for a in active}
        for rule, subject, severity in self._alerts - now:
            self.sink.set(
                "fleet_alerts_firing",
                0,
                {"rule": rule, "subject": subject, "severity": severity},
            )
        for rule, subject, severity in now:
            self.sink.set(
                "fleet_alerts_firing",
                1,
                {"rule": rule, "subject": subject, "severity": severity},
            )
        self._alerts = now

    # -- budgets --------------------------------------------------------------------------
    def budgets(self, snap: Mapping[str, Any]) -> None:
        """Spend and burn of the fleet, each pool, each configured tenant and each class;
        the daily USD limit and what is left of it wherever the spec sets one (also
        before anything was spent there)."""
        b = self.spec.budgets
        fleet = snap.get("fleet", {})
        rows: dict[tuple[str, str], tuple[float, float, float | None]] = {
            ("fleet", "all"): (
                fleet.get("used_usd", 0.0),
                fleet.get("burn_usd_per_h", 0.0),
                fleet.get("limit_usd"),
            )
        }
        for scope, section, limits in (
            ("pool", "pools", b.pools),
            ("tenant", "tenants", b.tenants),
        ):
            seen = snap.get(section, {})
            for name in {*seen, *limits}:
                if scope == "tenant" and name not in self._tenants:
                    continue  # configured tenants only: bounded labels
                row = seen.get(name, {})
                lim = limits.get(name)
                rows[(scope, name)] = (
                    row.get("spend_usd", 0.0),
                    row.get("burn_usd_per_h", 0.0),
                    lim.daily_usd if lim is not None else None,
                )
        for name, row in snap.get("classes", {}).items():
            rows[("class", name)] = (row["spend_usd"], 0.0, row.get("allocated_usd"))
        s = self.sink
        for (scope, name), (spend, burn, limit) in rows.items():
            tags = {"scope": scope, "name": name}
            s.set("fleet_budget_spend_usd", spend, tags)
            s.set("fleet_budget_burn_usd_per_hour", burn, tags)
            if limit is not None:
                s.set("fleet_budget_limit_usd", limit, tags)
                s.set("fleet_budget_remaining_usd", max(0.0, limit - spend), tags)


__all__ = ["ControlMetrics"]
