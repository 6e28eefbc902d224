"""fleet's metrics: one catalog, exported through Ray's metrics pipeline.

Every fleet metric is declared once in ``CATALOG`` (name, type, help, labels, buckets)
and recorded with ``ray.util.metrics`` by the process that knows the value, so Ray's
per-node metrics agent serves it and Ray's Prometheus service discovery finds it. Ray
prefixes each name with ``ray_`` (``EXPORTED_PREFIX``): ``fleet_tasks_total`` is
scraped as ``ray_fleet_tasks_total``; the Grafana dashboards and alert rules in
``monitoring/`` query the exported names.

Who records what:

- hosts (``fleet.runtime.host_metrics``): tasks by outcome, reason and tenant, retries,
  tokens and cost, breaker transitions (counters), and the task latency, queue-wait,
  execution and dispatch-overhead histograms, all counted in the host by an
  ``Aggregator`` and sent to Ray once per host tick (about every 0.5 s): one call per
  counter label set and 19 per histogram series that moved, none per task;
- queue shards (``fleet.runtime.queue_actor``): tasks they fail themselves (deadline
  passed, deliveries exhausted, cancelled), counted like the hosts';
- the controller, each control tick: the gauges (agents by state, hosts, queue depth
  and oldest age, in flight, breaker ejections and their cap, budget remaining and burn,
  control-actor restarts, firing alerts) and the queue shards' counters, from the
  shards' totals.

Labels are bounded by the spec: fleet (its name), pool, queue, shard, reason (a fixed
vocabulary), scope and name of budgets, and ``tenant`` only from the configured tenants
(``observability.metric_tenants`` and ``budgets.tenants``; any other is ``other``,
none is ``none``). No task or agent id is ever a label. Ray adds ``WorkerId`` and
``SessionName`` itself: a host's gauges and histograms leave with it (Ray's agent drops
a gauge not refreshed for two export intervals); its counters stay, frozen, so sums of
counters over hosts keep what a replaced host did.

``Sink`` is what the runtime records into: ``RaySink`` in Ray processes, ``MemorySink``
in tests (it also counts the series a workload makes).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from fleet.spec.fleet import FleetSpec

EXPORTED_PREFIX = "ray_"
FLEET_LABEL = "fleet"
NO_TENANT = "none"
OTHER_TENANT = "other"

# Seconds: from a no-op task's milliseconds to an LLM agent's minutes.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Kind(str, Enum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None

    @property
    def exported(self) -> str:
        """The name Prometheus sees (Ray's prefix added)."""
        return EXPORTED_PREFIX + self.name


def _defs(*defs: MetricDef) -> dict[str, MetricDef]:
    """The catalog: every metric's labels start with ``fleet`` (the fleet's name: two
    fleets on one cluster may name their pools and queues alike)."""
    return {d.name: dataclasses.replace(d, labels=(FLEET_LABEL, *d.labels)) for d in defs}


C, H, G = Kind.COUNTER, Kind.HISTOGRAM, Kind.GAUGE
CATALOG: dict[str, MetricDef] = _defs(
    # -- tasks (hosts, queue shards) ----------------------------------------------
    MetricDef(
        "fleet_tasks_total",
        C,
        "Tasks with a recorded outcome, by outcome (completed, failed) and reason "
        "(ok for completed tasks).",
        ("pool", "outcome", "reason", "tenant"),
    ),
    MetricDef(
        "fleet_task_retries_total",
        C,
        "Failed deliveries handed back to the queue for another try, by failure reason.",
        ("pool", "reason"),
    ),
    MetricDef(
        "fleet_tokens_total",
        C,
        "Model tokens used by completed tasks, by direction (input, output).",
        ("pool", "tenant", "direction"),
    ),
    MetricDef("fleet_cost_usd_total", C, "USD spent by completed tasks.", ("pool", "tenant")),
    MetricDef(
        "fleet_breaker_transitions_total",
        C,
        "Circuit-breaker state changes (agents' and dependencies'), by the state entered.",
        ("pool", "state"),
    ),
    MetricDef(
        "fleet_task_latency_seconds",
        H,
        "Seconds from a task's submission to its recorded outcome.",
        ("pool", "outcome"),
        LATENCY_BUCKETS_S,
    ),
    MetricDef(
        "fleet_task_queue_wait_seconds",
        H,
        "Seconds from a task's submission to its dispatch to a host.",
        ("pool",),
        LATENCY_BUCKETS_S,
    ),
    MetricDef(
        "fleet_task_execution_seconds",
        H,
        "Seconds an agent spent on a task (a task no agent ran is not observed).",
        ("pool", "outcome"),
        LATENCY_BUCKETS_S,
    ),
    MetricDef(
        "fleet_dispatch_overhead_seconds",
        H,
        "Seconds from the dispatcher sending a batch to its host starting it (one "
        "observation per batch).",
        ("pool",),
        LATENCY_BUCKETS_S,
    ),
    # -- queues (controller, from the shards' totals) -----------------------------
    MetricDef(
        "fleet_queue_enqueued_total", C, "Items accepted into the queue.", ("queue", "shard")
    ),
    MetricDef("fleet_queue_acked_total", C, "Items finished and removed.", ("queue", "shard")),
    MetricDef(
        "fleet_queue_redeliveries_total",
        C,
        "Items put back for another delivery.",
        ("queue", "shard"),
    ),
    MetricDef(
        "fleet_queue_lease_expiries_total",
        C,
        "Leases that expired without an ack.",
        ("queue", "shard"),
    ),
    MetricDef("fleet_queue_depth", G, "Ready items waiting for a holder.", ("queue", "shard")),
    MetricDef("fleet_queue_leased", G, "Items leased to a holder.", ("queue", "shard")),
    MetricDef(
        "fleet_queue_oldest_age_seconds",
        G,
        "Age of the oldest pending item.",
        ("queue", "shard"),
    ),
    # -- pools and agents (controller) --------------------------------------------
    MetricDef(
        "fleet_agents",
        G,
        "Logical agents by health state (breaker_ejected: held out by routing breakers).",
        ("pool", "state"),
    ),
    MetricDef("fleet_agents_desired", G, "Agents the autoscaler wants.", ("pool",)),
    MetricDef("fleet_hosts", G, "Hosts (Serve replicas) reporting.", ("pool",)),
    MetricDef(
        "fleet_in_flight", G, "Tasks sent to the pool's hosts and not yet settled.", ("pool",)
    ),
    MetricDef(
        "fleet_breaker_ejected_agents",
        G,
        "Agents held out of rotation by their breaker.",
        ("pool",),
    ),
    MetricDef(
        "fleet_breaker_max_ejected_agents",
        G,
        "Cap on agents ejected at once (max_ejected_share of the pool's agents).",
        ("pool",),
    ),
    MetricDef(
        "fleet_tasks_shed_total",
        C,
        "Tasks admission control refused at an entry point, by priority class and "
        "reason (shed: predicted to wait too long; unavailable: the pool cannot run; "
        "deadline_unreachable: the wait ahead would make it miss its deadline; "
        "deadline_exceeded: its deadline had passed).",
        ("pool", "priority_class", "reason", "tenant"),
    ),
    MetricDef(
        "fleet_tasks_bulkhead_refused_total",
        C,
        "Tasks an entry point did not queue because their tenant held its queued "
        "bulkhead in the pool (bulkheads.tenant.max_queued), by priority class.",
        ("pool", "priority_class", "tenant"),
    ),
    MetricDef(
        "fleet_tasks_degraded_total",
        C,
        "Tasks an entry point sent to the pool's fallback pool because its degrade rule "
        "held (pools[].degrade), by priority class.",
        ("pool", "priority_class", "tenant"),
    ),
    MetricDef(
        "fleet_pool_degraded",
        G,
        "1 while the pool's degrade rule holds (its new tasks go to its fallback pool).",
        ("pool",),
    ),
    MetricDef(
        "fleet_admission_drain_per_second",
        G,
        "Tasks per second the pool can complete, as admission control estimates it "
        "(0 until measured).",
        ("pool",),
    ),
    MetricDef(
        "fleet_cascade_guard_state",
        G,
        "Fleet cascade guard: 0 closed, 1 half-open, 2 open.",
        (),
    ),
    MetricDef(
        "fleet_control_actor_restarts",
        G,
        "Restarts of each control actor since the fleet started.",
        ("actor",),
    ),
    MetricDef(
        "fleet_alerts_firing",
        G,
        "1 while an in-process alert fires on a subject.",
        ("rule", "subject", "severity"),
    ),
    # -- budgets (controller) -------------------------------------------------------
    MetricDef(
        "fleet_budget_remaining_usd",
        G,
        "USD left today under a budget's limit.",
        ("scope", "name"),
    ),
    MetricDef(
        "fleet_budget_spend_usd", G, "USD settled in the current day.", ("scope", "name")
    ),
    MetricDef(
        "fleet_budget_burn_usd_per_hour",
        G,
        "USD per hour over the burn-rate window.",
        ("scope", "name"),
    ),
    MetricDef(
        "fleet_budget_limit_usd", G, "Daily USD limit (or allocation).", ("scope", "name")
    ),
)
del C, H, G


class Sink(Protocol):
    """Where metrics go (``RaySink`` or ``MemorySink``). Histograms arrive as one
    process's cumulative bucket counts (``Aggregator``)."""

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...
    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...
    def histogram(
        self, name: str, tags: Mapping[str, str], cumulative: Sequence[int], total: float
    ) -> None: ...


class RaySink:
    """``ray.util.metrics`` objects for the catalog, made on first use in this process.

    A histogram is exported as the series of a Prometheus histogram
    (``<name>_bucket{le}``, ``<name>_count``, ``<name>_sum``), carried by Ray gauges set
    to this process's cumulative counts. Hand-written on purpose: Ray's ``Histogram``
    takes one call per observation, and three per task cost 16% of the core benchmark's
    throughput (BENCHMARKS.md); ``Aggregator`` counts them here and sets the gauges once
    per flush. Counts only grow while the process lives; a process that ends takes its
    series with it (Ray's agent drops a gauge that is no longer refreshed), which
    ``rate`` and ``increase`` read as the end of that series, as for any replaced
    target.
    """

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}

    def _get(self, name: str, kind: Kind, doc: str, labels: Sequence[str]) -> Any:
        m = self._metrics.get(name)
        if m is None:
            from ray.util import metrics

            if kind is Kind.COUNTER:
                m = metrics.Counter(name, doc, tag_keys=tuple(labels))
            else:
                m = metrics.Gauge(name, doc, tag_keys=tuple(labels))
            self._metrics[name] = m
        return m

    def _catalog(self, name: str) -> Any:
        d = CATALOG[name]
        return self._get(name, d.kind, d.help, d.labels)

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        if value > 0:
            self._catalog(name).inc(value, dict(tags))

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._catalog(name).set(value, dict(tags))

    def histogram(
        self, name: str, tags: Mapping[str, str], cumulative: Sequence[int], total: float
    ) -> None:
        d = CATALOG[name]
        bucket = self._get(f"{name}_bucket", Kind.GAUGE, d.help, (*d.labels, "le"))
        for le, n in zip(_le_values(d), cumulative, strict=True):
            bucket.set(n, {**tags, "le": le})
        plain = dict(tags)
        self._get(f"{name}_count", Kind.GAUGE, d.help, d.labels).set(cumulative[-1], plain)
        self._get(f"{name}_sum", Kind.GAUGE, d.help, d.labels).set(total, plain)


def _le_values(d: MetricDef) -> list[str]:
    return [*(repr(float(b)) for b in d.buckets or ()), "+Inf"]


class Aggregator:
    """Counts and observations held in this process until ``flush`` sends them to the
    sink: counters as their growth since the last flush (one call per label set),
    histograms as their cumulative bucket counts (see ``RaySink``). Callers pass the
    labels of one metric in one order, which keys them."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        # (name, labels) -> [per-bucket counts (the last: +Inf), sum, dirty]
        self._hists: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]] = {}
        self._bounds = {n: d.buckets for n, d in CATALOG.items() if d.kind is Kind.HISTOGRAM}

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        if value:
            key = (name, tuple(tags.items()))
            self._counts[key] = self._counts.get(key, 0.0) + value

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.observe_many(name, (value,), tags)

    def observe_many(
        self, name: str, values: Iterable[float], tags: Mapping[str, str]
    ) -> None:
        """Observations of one histogram series (a negative one counts as 0: clocks of
        two machines may disagree by that much)."""
        key = (name, tuple(tags.items()))
        h = self._hists.get(key)
        bounds = self._bounds[name] or ()
        if h is None:
            h = self._hists[key] = [[0] * (len(bounds) + 1), 0.0, True]
        counts, where, total = h[0], bisect.bisect_left, 0.0
        for v in values:
            if v < 0.0:
                v = 0.0
            counts[where(bounds, v)] += 1
            total += v
        h[1] += total
        h[2] = True

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (name, tags), v in counts.items():
            self.sink.inc(name, v, dict(tags))
        for (name, tags), h in self._hists.items():
            if h[2]:
                h[2] = False
                self.sink.histogram(name, dict(tags), list(itertools.accumulate(h[0])), h[1])


class MemorySink:
    """Records in memory, checked against the catalog as Ray would (tests).

    ``histograms`` holds each label set's latest cumulative counts and sum."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.histograms: dict[
            tuple[str, tuple[tuple[str, str], ...]], tuple[list[int], float]
        ] = {}
        self.calls = 0

    @staticmethod
    def _key(name: str, tags: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        d = CATALOG[name]
        if set(tags) != set(d.labels):
            raise ValueError(f"{name}: labels {sorted(tags)} are not {sorted(d.labels)}")
        return name, tuple(sorted(tags.items()))

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.calls += 1
        k = self._key(name, tags)
        self.counters[k] = self.counters.get(k, 0.0) + value

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.calls += 1
        self.gauges[self._key(name, tags)] = value

    def histogram(
        self, name: str, tags: Mapping[str, str], cumulative: Sequence[int], total: float
    ) -> None:
        self.calls += 1
        if len(cumulative) != len(CATALOG[name].buckets or ()) + 1:
            raise ValueError(f"{name}: {len(cumulative)} bucket counts")
        self.histograms[self._key(name, tags)] = (list(cumulative), total)

    def total(self, name: str, **match: str) -> float:
        """Sum of a counter (or a histogram's count) over series matching ``match``."""
        out = 0.0
        for (n, tags), v in self.counters.items():
            if n == name and all(dict(tags).get(k) == m for k, m in match.items()):
                out += v
        for (n, tags), (cum, _) in self.histograms.items():
            if n == name and all(dict(tags).get(k) == m for k, m in match.items()):
                out += cum[-1]
        return out


class WithLabels:
    """A sink that adds fixed labels (the fleet's name) to everything sent through it."""

    def __init__(self, sink: Sink, labels: Mapping[str, str]):
        self.sink = sink
        self.labels = dict(labels)

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.sink.inc(name, value, {**self.labels, **tags})

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.sink.set(name, value, {**self.labels, **tags})

    def histogram(
        self, name: str, tags: Mapping[str, str], cumulative: Sequence[int], total: float
    ) -> None:
        self.sink.histogram(name, {**self.labels, **tags}, cumulative, total)


def for_fleet(sink: Sink, fleet: str) -> Sink:
    """``sink``, with every metric labelled with fleet ``fleet``."""
    return WithLabels(sink, {FLEET_LABEL: fleet})


class TenantLabels:
    """A task's ``tenant`` label: its tenant if configured, else ``other``; ``none``
    without one. At most ``len(known) + 2`` values, whatever the payloads say."""

    def __init__(self, known: Iterable[str]):
        self.known = frozenset(known)

    @classmethod
    def of_spec(cls, spec: FleetSpec) -> TenantLabels:
        return cls((*spec.observability.metric_tenants, *spec.budgets.tenants))

    def __call__(self, tenant: str | None) -> str:
        if tenant is None:
            return NO_TENANT
        return tenant if tenant in self.known else OTHER_TENANT


def max_series(spec: FleetSpec, hosts_ever: int, shards: int) -> int:
    """An upper bound on the fleet's series: per pool and per host that ever lived, the
    host's series at most; the controller's and queue shards' series once. Used by the
    cardinality test and stated in ARCHITECTURE.md."""
    from fleet.observability.reasons import REASONS

    tenants = len(TenantLabels.of_spec(spec).known) + 2
    hist = len(LATENCY_BUCKETS_S) + 3
    per_host = (
        (1 + len(REASONS)) * tenants  # tasks_total: ok plus each failure reason
        + len(REASONS)  # retries
        + 3 * tenants  # tokens (2 directions), cost
        + 3  # breaker states
        + hist * (2 + 1 + 2 + 1)  # latency, queue wait, execution (x outcome), dispatch
    )
    pools = len(spec.pools)
    per_pool_gauges = 8 + 4 + 2  # agents by state (+ breaker_ejected), others, drain, degraded
    # Refusals by class and tenant: shed (by 4 reasons) and bulkhead.
    shed = len(spec.budgets.priority_classes) * (4 + 1 + 1) * tenants  # + degraded
    queue = shards * pools * 7
    budgets = 4 * (2 + pools + len(spec.budgets.tenants) + 8)
    control = 8 + 1 + 64  # actors, guard, alerts
    return per_host * hosts_ever + (per_pool_gauges + shed) * pools + queue + budgets + control
