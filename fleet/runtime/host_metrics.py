"""A host's metrics: what its batches did, counted in the host, sent to Ray per tick.

``AgentHost`` tells ``HostMetrics`` when a batch arrives (queue wait per task, dispatch
overhead per batch), when outcomes are durable in the ledger (``recorded``: one call
per ledger record call, which coalesces the outcomes of one or more batches) and when a
failure is handed back for a retry. Everything is counted in an ``Aggregator``; the
host's tick calls ``flush`` (about every 0.5 s), which sends each label set's counts
and each histogram's buckets to Ray: no Ray call per task. Breaker transitions come
from the core's own event counts, read at flush. A host killed between two flushes
takes its last half second of counts with it (its outcomes are in the ledger).
Queue shards count the tasks they fail themselves (deadline passed, deliveries
exhausted, cancelled) with one of these too: ``recorded``, then ``flush`` at once.
Labels: see ``fleet.observability.metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fleet.observability.metrics import (
    NO_TENANT,
    Aggregator,
    RaySink,
    Sink,
    TenantLabels,
    for_fleet,
)
from fleet.observability.reasons import outcome_labels, reason_label
from fleet.spec.fleet import FleetSpec
from fleet.task import (
    TENANT_FIELD,
    TENANT_ID_PREFIX,
    Item,
    Outcome,
    payload_tenant,
    tenant_of_id,
)

_TENANT_BYTES = f'"{TENANT_FIELD}"'.encode()
_TRANSITION = "transition:"
DEFAULT_FLEET: str = FleetSpec.model_fields["name"].default
# Payload tenants of tasks in flight kept at most (entries leave when their task is
# recorded or handed back; this bounds a path overlooked).
MAX_PAYLOAD_TENANTS = 100_000


class HostMetrics:
    """One host's metric recording (see the module docstring)."""

    def __init__(
        self,
        pool: str,
        tenants: TenantLabels,
        sink: Sink | None = None,
        fleet: str = DEFAULT_FLEET,
    ):
        self.pool = pool
        self.sink: Sink = sink if sink is not None else RaySink()
        self.agg = Aggregator(for_fleet(self.sink, fleet))
        self.tenants = tenants
        self._pool_tags = {"pool": pool}
        # Payload tenants of tasks in flight (``other`` unless configured).
        self._payload_tenant: dict[str, str] = {}
        self._breakers: dict[str, int] = {}

    # -- tenant labels --------------------------------------------------------------
    def _tenant(self, task_id: str) -> str:
        if task_id.startswith(TENANT_ID_PREFIX):
            return self.tenants(tenant_of_id(task_id))
        if self._payload_tenant:
            t = self._payload_tenant.pop(task_id, None)
            if t is not None:
                return t
        return NO_TENANT

    def _note_payload_tenants(self, items: Iterable[Item]) -> None:
        """Keep the configured tenants named in payloads (decoded only when the payload
        mentions a tenant at all)."""
        for it in items:
            if _TENANT_BYTES in it.payload and not it.id.startswith(TENANT_ID_PREFIX):
                t = payload_tenant(it.payload)
                if t is not None:
                    pt = self._payload_tenant
                    if len(pt) >= MAX_PAYLOAD_TENANTS:  # a backstop: the oldest go
                        del pt[next(iter(pt))]
                    pt[it.id] = self.tenants(t)

    # -- events -----------------------------------------------------------------------
    def batch_arrived(
        self, items: list[Item], sent_unix_s: float | None, now_unix_s: float
    ) -> None:
        """Queue wait per task (submission to dispatch) and the batch's dispatch
        overhead (dispatch to arrival)."""
        if not items:
            return
        self._note_payload_tenants(items)
        sent = now_unix_s if sent_unix_s is None else sent_unix_s
        tags = self._pool_tags
        self.agg.observe_many(
            "fleet_task_queue_wait_seconds", [sent - it.submitted_unix_s for it in items], tags
        )
        if sent_unix_s is not None:
            self.agg.observe("fleet_dispatch_overhead_seconds", now_unix_s - sent, tags)

    def retried(self, reason: str | None) -> None:
        tags = {"pool": self.pool, "reason": reason_label(reason)}
        self.agg.inc("fleet_task_retries_total", 1, tags)

    def recorded(self, outcomes: Iterable[Outcome], recorded_unix_s: float) -> None:
        """Outcomes now durable: counts by outcome, reason and tenant; tokens and cost;
        latency and execution time per task."""
        pool = self.pool
        counts: dict[tuple[str, str, str], int] = {}
        tokens: dict[str, list[float]] = {}
        # outcome -> (latencies, execution times): one histogram update per outcome
        times: dict[str, tuple[list[float], list[float]]] = {}
        tenant_of = self._tenant
        for o in outcomes:
            outcome, reason = outcome_labels(o.ok, o.reason)
            tenant = tenant_of(o.task_id)
            k = (outcome, reason, tenant)
            counts[k] = counts.get(k, 0) + 1
            if o.input_tokens or o.output_tokens or o.cost_usd:
                t = tokens.setdefault(tenant, [0.0, 0.0, 0.0])
                t[0] += o.input_tokens
                t[1] += o.output_tokens
                t[2] += o.cost_usd
            lat, exe = times.get(outcome) or times.setdefault(outcome, ([], []))
            lat.append(recorded_unix_s - o.submitted_unix_s)
            if o.started_unix_s is not None:
                exe.append(o.finished_unix_s - o.started_unix_s)
        for outcome, (lat, exe) in times.items():
            tags = {"pool": pool, "outcome": outcome}
            self.agg.observe_many("fleet_task_latency_seconds", lat, tags)
            if exe:
                self.agg.observe_many("fleet_task_execution_seconds", exe, tags)
        inc = self.agg.inc
        for (outcome, reason, tenant), n in counts.items():
            inc(
                "fleet_tasks_total",
                n,
                {"pool": pool, "outcome": outcome, "reason": reason, "tenant": tenant},
            )
        for tenant, (i, out, usd) in tokens.items():
            inc(
                "fleet_tokens_total", i, {"pool": pool, "tenant": tenant, "direction": "input"}
            )
            inc(
                "fleet_tokens_total",
                out,
                {"pool": pool, "tenant": tenant, "direction": "output"},
            )
            inc("fleet_cost_usd_total", usd, {"pool": pool, "tenant": tenant})

    def breaker_counts(self, counts: Mapping[str, int]) -> None:
        """The core's cumulative breaker event counts: transitions since the last call."""
        for key, n in counts.items():
            if key.startswith(_TRANSITION):
                inc = n - self._breakers.get(key, 0)
                if inc > 0:
                    self.agg.inc(
                        "fleet_breaker_transitions_total",
                        inc,
                        {"pool": self.pool, "state": key[len(_TRANSITION) :]},
                    )
                    self._breakers[key] = n

    def flush(self, breaker_counts: Mapping[str, int] | None = None) -> None:
        """Send what was counted since the last flush to Ray (the host's tick), with
        the breaker transitions in the core's ``breaker_counts``."""
        if breaker_counts is not None:
            self.breaker_counts(breaker_counts)
        self.agg.flush()

    def forget(self, task_ids: Iterable[str]) -> None:
        """Tasks that leave without an outcome here (handed back): drop their tenants."""
        if self._payload_tenant:
            for tid in task_ids:
                self._payload_tenant.pop(tid, None)


__all__ = ["HostMetrics"]
