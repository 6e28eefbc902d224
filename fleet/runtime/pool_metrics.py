"""Prometheus metrics for pools: dispatch, breakers and retries, from dispatcher stats.

The controller calls ``update`` each control tick with ``Dispatcher.stats()``: per pool
the agents in service, tasks in flight, agents their breakers hold out of rotation
(ejected) and the cap on that number, hosts in panic mode, and the retry counts the
hosts report. Values are the latest per pool (gauges), since the hosts' cumulative
counts restart with a replaced host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

# dispatcher stats key -> (metric name, help)
_GAUGES = {
    "active_agents": ("agents", "Logical agents in service."),
    "in_flight": ("in_flight", "Tasks leased to the pool's hosts and not yet finished."),
    "capacity": ("capacity", "Agent slots the pool may fill."),
    "ejected_agents": ("ejected_agents", "Agents held out of rotation by their breaker."),
    "max_ejected_agents": ("max_ejected_agents", "Cap on agents ejected at once."),
    "panic_hosts": ("panic_hosts", "Hosts in breaker panic mode (too few healthy agents)."),
    "retried_items": ("retried_items", "Items handed back to the queue for a retry."),
    "retry_waiting": ("retry_waiting", "Retried items waiting out their backoff."),
    "host_retries": ("host_retries", "Retries decided by the hosts reporting now."),
    "retry_budget_denied": (
        "retry_budget_denied",
        "Retryable failures recorded because the retry budget was spent.",
    ),
    "host_failures": ("host_failures", "Batches whose host call failed (nacked at once)."),
}


class PoolMetrics:
    """The pool metric family (``fleet_pool_*``), registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "fleet_pool"):
        self.gauges = {
            k: Gauge(f"{prefix}_{name}", doc, ("pool",), registry=registry)
            for k, (name, doc) in _GAUGES.items()
        }

    def update(self, dispatcher_stats: Mapping[str, Mapping[str, Any]]) -> None:
        for pool, stats in dispatcher_stats.items():
            for key, gauge in self.gauges.items():
                value = stats.get(key)
                if isinstance(value, (int, float)):
                    gauge.labels(pool=pool).set(value)
