"""Prometheus metrics for budgets: spend, burn rate, limits and alerts per scope.

The controller owns one ``BudgetMetrics`` on its registry and, each control tick, calls
``update`` with the budget actor's snapshot (``BudgetBook.snapshot``) and ``alert`` with
each new budget alert. Gauges carry ``scope`` (fleet, pool, tenant, agent, class) and
``name``; agents are the snapshot's top spenders only, to bound the label count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

_LABELS = ("scope", "name")


class BudgetMetrics:
    """The budget metric family, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "fleet_budget"):
        kw: dict[str, Any] = {"registry": registry}
        self.spend = Gauge(
            f"{prefix}_spend_usd", "USD settled in the current day.", _LABELS, **kw
        )
        self.burn = Gauge(
            f"{prefix}_burn_usd_per_hour",
            "USD per hour over the burn-rate window.",
            _LABELS,
            **kw,
        )
        self.tokens = Gauge(
            f"{prefix}_tokens", "Tokens settled in the current day.", _LABELS, **kw
        )
        self.limit = Gauge(
            f"{prefix}_limit_usd", "Daily USD limit (or allocation).", _LABELS, **kw
        )
        self.reserved = Gauge(
            f"{prefix}_reserved_usd", "USD held by open reservations.", (), **kw
        )
        self.refused = Gauge(
            f"{prefix}_refused_tasks",
            "Tasks refused by a budget, by the refusing scope.",
            ("scope",),
            **kw,
        )
        self.expired = Gauge(
            f"{prefix}_expired_reservations",
            "Reservations settled at their estimate after their lease "
            "expired (their host died).",
            (),
            **kw,
        )
        self.overrun = Gauge(
            f"{prefix}_overrun_usd", "USD used beyond reservations (should stay 0).", (), **kw
        )
        self.alerts = Counter(
            f"{prefix}_alerts", "Budget usage passed a threshold.", ("threshold",), **kw
        )

    def update(self, snap: Mapping[str, Any]) -> None:
        fleet = snap.get("fleet", {})
        self.spend.labels("fleet", "all").set(fleet.get("used_usd", 0.0))
        self.burn.labels("fleet", "all").set(fleet.get("burn_usd_per_h", 0.0))
        if fleet.get("limit_usd") is not None:
            self.limit.labels("fleet", "all").set(fleet["limit_usd"])
        for section, scope in (
            ("pools", "pool"),
            ("tenants", "tenant"),
            ("top_agents", "agent"),
        ):
            for name, row in snap.get(section, {}).items():
                self.spend.labels(scope, name).set(row["spend_usd"])
                self.burn.labels(scope, name).set(row["burn_usd_per_h"])
                self.tokens.labels(scope, name).set(row["tokens"])
                if "limit_usd" in row:
                    self.limit.labels(scope, name).set(row["limit_usd"])
        for name, row in snap.get("classes", {}).items():
            self.spend.labels("class", name).set(row["spend_usd"])
            self.limit.labels("class", name).set(row["allocated_usd"])
        self.reserved.set(snap.get("open_reserved_usd", 0.0))
        for scope, n in snap.get("refused_tasks", {}).items():
            self.refused.labels(scope).set(n)
        self.expired.set(snap.get("expired_reservations", 0))
        self.overrun.set(snap.get("overrun_usd", 0.0))

    def alert(self, threshold: float) -> None:
        self.alerts.labels(f"{threshold:g}").inc()
