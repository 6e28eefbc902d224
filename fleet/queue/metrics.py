"""Prometheus metrics for queues: the metric objects and helpers that update them.

The fleet's controller creates one ``QueueMetrics`` on its own ``CollectorRegistry``
(served with the pool and budget metrics by ``Controller.metrics_text``, which
``FleetClient.metrics_text()`` and the ingress's ``GET /metrics`` read) and, each
control tick, calls ``update_from_stats`` per shard (or ``update_from_health`` with the
monitor's report) and ``update_alerts`` with the evaluator's active alerts. Tests pass
their own ``CollectorRegistry``; without one, the metrics register on
prometheus_client's global registry.

Shard stats carry cumulative totals; Prometheus counters only go up, so each update adds
the increase since the last one (a shard that restarted reports lower totals: its new
totals count as the increase).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from fleet.policy.queue_alerts import ActiveAlert
from fleet.queue.lease_queue import QueueStats
from fleet.queue.monitor import QueueHealth

_LABELS = ("queue", "shard")
# QueueStats total -> counter name (without the _total suffix prometheus adds)
_COUNTERS = {
    "enqueued_total": ("enqueued", "Items accepted into the queue."),
    "dequeued_total": ("dequeued", "Leases handed out (first deliveries and redeliveries)."),
    "acked_total": ("acked", "Items finished and removed."),
    "expired_total": ("lease_expiries", "Leases that expired without an ack."),
    "redelivered_total": ("redeliveries", "Items put back for another delivery."),
    "exhausted_total": ("exhausted", "Items failed after max_deliveries deliveries."),
    "deadline_exceeded_total": ("deadline_exceeded", "Items failed past their deadline."),
    "duplicates_total": ("duplicates", "Submitted ids already pending (ignored)."),
}
_GAUGES = {
    "depth": ("depth", "Ready items waiting for a holder."),
    "leased": ("leased", "Items leased to a holder."),
    "oldest_age_s": ("oldest_age_seconds", "Age of the oldest pending item."),
}
_QUANTILES = (("0.5", "age_p50_s"), ("0.9", "age_p90_s"), ("0.99", "age_p99_s"))


class QueueMetrics:
    """The queue metric family, registered on ``registry``."""

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, prefix: str = "fleet_queue"
    ):
        kw: dict[str, Any] = {"registry": registry}
        self.counters = {
            k: Counter(f"{prefix}_{n}", doc, _LABELS, **kw)
            for k, (n, doc) in _COUNTERS.items()
        }
        self.gauges = {
            k: Gauge(f"{prefix}_{n}", doc, _LABELS, **kw) for k, (n, doc) in _GAUGES.items()
        }
        self.age = Gauge(
            f"{prefix}_age_seconds",
            "Estimated age quantiles of pending items.",
            (*_LABELS, "quantile"),
            **kw,
        )
        self.enqueue_rate = Gauge(
            f"{prefix}_enqueue_per_second", "Smoothed enqueue rate.", ("queue",), **kw
        )
        self.dequeue_rate = Gauge(
            f"{prefix}_dequeue_per_second", "Smoothed dequeue rate.", ("queue",), **kw
        )
        self.shard_max_over_mean = Gauge(
            f"{prefix}_shard_max_over_mean",
            "Deepest shard over the mean shard depth.",
            ("queue",),
            **kw,
        )
        self.shard_cv = Gauge(
            f"{prefix}_shard_cv", "Coefficient of variation of shard depths.", ("queue",), **kw
        )
        self.alert_active = Gauge(
            f"{prefix}_alert_active",
            "1 while an alert rule fires on a subject.",
            ("rule", "subject", "severity"),
            **kw,
        )
        self._last: dict[tuple[str, str], dict[str, int]] = {}
        self._alerts: set[tuple[str, str, str]] = set()

    def update_from_stats(
        self, queue: str, shard: int, stats: QueueStats | Mapping[str, Any]
    ) -> None:
        """Set one shard's gauges and advance its counters from a stats snapshot."""
        d = dataclasses.asdict(stats) if isinstance(stats, QueueStats) else stats
        labels = (queue, str(shard))
        last = self._last.setdefault(labels, {})
        for k, c in self.counters.items():
            total = int(d.get(k, 0))
            prev = last.get(k, 0)
            inc = total - prev if total >= prev else total  # lower: the shard restarted
            if inc:
                c.labels(*labels).inc(inc)
            last[k] = total
        for k, g in self.gauges.items():
            g.labels(*labels).set(float(d.get(k, 0.0)))
        for q, field in _QUANTILES:
            self.age.labels(*labels, q).set(float(d.get(field, 0.0)))

    def update_from_health(self, health: QueueHealth) -> None:
        """Set the queue-wide gauges (rates, balance) from the monitor's report."""
        self.enqueue_rate.labels(health.queue).set(health.enqueue_per_s)
        self.dequeue_rate.labels(health.queue).set(health.dequeue_per_s)
        self.shard_max_over_mean.labels(health.queue).set(health.balance.max_over_mean)
        self.shard_cv.labels(health.queue).set(health.balance.cv)

    def update_alerts(self, active: Iterable[ActiveAlert]) -> None:
        """1 for each firing alert; alerts that cleared drop back to 0."""
        now = {(a.rule, a.subject, a.severity) for a in active}
        for labels in self._alerts - now:
            self.alert_active.labels(*labels).set(0)
        for labels in now:
            self.alert_active.labels(*labels).set(1)
        self._alerts = now
