"""Prometheus recording and alerting rules for one fleet, rendered from its spec.

``render_rules(spec)`` returns a Prometheus rule file (as a dict; ``render_rules_yaml``
as text, what ``fleet rules SPEC`` prints), so Prometheus and fleet's in-process
evaluators judge the fleet by one definition, the spec: the queue alert rules of
``queues.alerts``, the cascade share of ``health.cascade``, the latency target of
``observability.latency_target_s``. Queries use the names Ray exports
(``MetricDef.exported``: ``ray_fleet_*``) and aggregate with ``sum by``/``max by`` over
fleet's own labels, so Ray's per-process labels (``WorkerId``, ``NodeAddress``...) never
split an alert. Gauges the controller sets are taken with ``max by`` first: a restarted
controller's old series lingers for two export intervals beside the new one, and a
``sum`` would count it twice.

Every fleet metric carries a ``fleet`` label (the spec's ``name``): every selector of the
rules matches ``fleet="<spec.name>"`` (of the exported metrics, and of the recording
rules, which two fleets' rule files in one Prometheus both record, one series per fleet),
and every aggregation keeps the ``fleet`` label, so the rules of one fleet never see
another's pools and queues of the same name, and its alerts fire per fleet.

The alerts:

- ``FleetQueueDepthHigh``: a queue's ready items over 10,000 (``DEFAULT_DEPTH_THRESHOLD``);
- ``FleetQueueOldestItemOld``: its oldest pending item older than 300 s;
- ``FleetBreakerEjectionsNearCap``: a pool's breaker-ejected agents at 80% of the cap;
- ``FleetAgentCascade``: more than ``health.cascade.cascade_share`` of the agents failing
  (unhealthy or restarting, ``fleet.policy.health.FAILING_STATES``), and at least
  ``min_failing_agents``: the condition that opens the in-process cascade guard. It is
  computed from ``ray_fleet_agents`` rather than read from
  ``ray_fleet_cascade_guard_state``, because the guard stays open (then half-open) until
  its probes succeed: the alert says that agents are failing now, and clears when they
  recover, and its value is the failing share, comparable with the spec's threshold;
- ``FleetControlActorRestarted``: a control actor restarted in the last 10 minutes
  (``increase`` of the per-actor restart count; it clears 10 minutes later);
- ``FleetBudgetBurnHigh``: a fleet, pool or tenant budget burning more than
  ``BURN_FACTOR`` times its daily limit / 24 per hour (it would run out in less than
  24 / ``BURN_FACTOR`` hours). The query joins the burn with the exported limit, so it is
  silent for a scope without a limit (and for a fleet without budgets);
- ``FleetTaskLatencyHigh``: a pool's p95 task latency over ``latency_target_s``;
- one alert per other rule of ``queues.alerts``.

A ``queues.alerts`` rule on ``depth`` or ``oldest_age_s`` replaces the default alert of
that metric (the first such rule: its threshold, operator, scope, ``for_s`` and severity).
Rules map to PromQL over the exported queue metrics (``_QUEUE_EXPRS``); the metrics with
no exported equivalent, ``age_p50_s``, ``age_p90_s``, ``age_p99_s`` (no age histogram is
exported), ``dequeue_per_s`` (dequeues are not exported, acks are) and
``deadline_exceeded_per_s`` (counted by pool, in ``ray_fleet_tasks_total``, not by
queue), are skipped, with a comment in the rendered file. A rule's ``clear_threshold``
is rendered as hysteresis: once the alert fires, it keeps firing while the value still
passes ``clear_threshold`` (through Prometheus's own ``ALERTS`` series).

Several fleets can share one Prometheus: load each fleet's rule file (``fleet rules``
of each spec); their recording rules share names and differ by their ``fleet`` label.

``panel_queries`` and ``instantiate`` turn the Grafana dashboards of
``monitoring/grafana`` into plain PromQL, for tests that run them against Prometheus;
``metric_names`` lists the metrics a query reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from fleet.observability.metrics import CATALOG, Kind
from fleet.policy.health import FAILING_STATES, AgentState
from fleet.spec.fleet import FleetSpec
from fleet.spec.queues import AlertMetric, AlertScope, QueueAlertRule

DEFAULT_DEPTH_THRESHOLD = 10_000.0
DEFAULT_OLDEST_AGE_S = 300.0
DEFAULT_QUEUE_FOR_S = 300.0
DEFAULT_OLDEST_AGE_FOR_S = 60.0
EJECTION_NEAR_CAP_SHARE = 0.8
BREAKER_FOR_S = 60.0
CASCADE_FOR_S = 60.0
CONTROL_RESTART_WINDOW = "10m"
BURN_FACTOR = 2.0  # alert when a day's budget would last less than 12 hours
BURN_FOR_S = 300.0
LATENCY_FOR_S = 300.0
SHED_FOR_S = 120.0
RATE_WINDOW = "5m"
LATENCY_QUANTILES = (0.5, 0.95, 0.99)
RECORDING_PREFIX = "fleet:"
BUDGET_SCOPES = ("fleet", "pool", "tenant")  # agents' and classes' limits are allocations

_X = {d.name: d.exported for d in CATALOG.values()}


def _m(name: str) -> str:
    """The exported name of a catalog metric (KeyError for a name not in the catalog)."""
    return _X[name]


def _fleet_matcher(fleet: str) -> str:
    return f"fleet={_string(fleet)}"


def _sel(name: str, fleet: str, suffix: str = "", matchers: str = "") -> str:
    """A selector of ``fleet``'s series of a catalog metric (``suffix``: ``_bucket``...),
    with more ``matchers`` (``state=~"..."``) if given."""
    extra = f", {matchers}" if matchers else ""
    return f"{_m(name)}{suffix}{{{_fleet_matcher(fleet)}{extra}}}"


def _rec(name: str, fleet: str, matchers: str = "") -> str:
    """A selector of ``fleet``'s series of a recording rule."""
    extra = f", {matchers}" if matchers else ""
    return f"{name}{{{_fleet_matcher(fleet)}{extra}}}"


# -- recording rules ------------------------------------------------------------------

REC_TASKS_RATE = "fleet:tasks:rate5m"
REC_RETRIES_RATE = "fleet:task_retries:rate5m"
REC_TOKENS_RATE = "fleet:tokens:rate5m"
REC_COST_RATE = "fleet:cost_usd:rate5m"
REC_LATENCY = "fleet:task_latency_seconds:p{q}_5m"
REC_QUEUE_WAIT_P95 = "fleet:task_queue_wait_seconds:p95_5m"
REC_QUEUE_DEPTH = "fleet:queue_depth:sum"
REC_QUEUE_LEASED = "fleet:queue_leased:sum"
REC_QUEUE_OLDEST = "fleet:queue_oldest_age_seconds:max"
REC_AGENTS = "fleet:agents:max"
REC_AGENTS_FAILING = "fleet:agents_failing:sum"
REC_AGENTS_FAILING_SHARE = "fleet:agents_failing:share"
REC_EJECTED = "fleet:breaker_ejected_agents:max"
REC_EJECTED_CAP = "fleet:breaker_max_ejected_agents:max"
REC_RESTARTS = "fleet:control_actor_restarts:max"
REC_BURN = "fleet:budget_burn_usd_per_hour:max"
REC_LIMIT = "fleet:budget_limit_usd:max"
REC_SHED_RATE = "fleet:tasks_shed:rate5m"
REC_SHED_SHARE = "fleet:tasks_shed:share5m"

_AGENT_STATES = "|".join(s.value for s in AgentState)  # not breaker_ejected: a subset
_FAILING = "|".join(sorted(s.value for s in FAILING_STATES))


def _q(q: float) -> str:
    return f"{q * 100:g}"


def _recording_rules(fleet: str) -> list[dict[str, str]]:
    def controller_gauge(metric: str, labels: str) -> str:
        return f"max by (fleet, {labels}) ({_sel(metric, fleet)})"

    def rate(metric: str, suffix: str = "") -> str:
        return f"rate({_sel(metric, fleet, suffix)}[{RATE_WINDOW}])"

    rules = [
        (
            REC_TASKS_RATE,
            f"sum by (fleet, pool, outcome, reason) ({rate('fleet_tasks_total')})",
        ),
        (
            REC_RETRIES_RATE,
            f"sum by (fleet, pool, reason) ({rate('fleet_task_retries_total')})",
        ),
        (
            REC_TOKENS_RATE,
            f"sum by (fleet, pool, direction) ({rate('fleet_tokens_total')})",
        ),
        (REC_COST_RATE, f"sum by (fleet, pool) ({rate('fleet_cost_usd_total')})"),
    ]
    latency = rate("fleet_task_latency_seconds", "_bucket")
    for q in LATENCY_QUANTILES:
        rules.append(
            (
                REC_LATENCY.format(q=_q(q)),
                f"histogram_quantile({q:g}, sum by (fleet, pool, le) ({latency}))",
            )
        )
    wait = rate("fleet_task_queue_wait_seconds", "_bucket")
    rules += [
        (
            REC_QUEUE_WAIT_P95,
            f"histogram_quantile(0.95, sum by (fleet, pool, le) ({wait}))",
        ),
        # Per shard first (max: one controller sets each), then over the queue's shards.
        (
            REC_QUEUE_DEPTH,
            f"sum by (fleet, queue) ({controller_gauge('fleet_queue_depth', 'queue, shard')})",
        ),
        (
            REC_QUEUE_LEASED,
            f"sum by (fleet, queue) "
            f"({controller_gauge('fleet_queue_leased', 'queue, shard')})",
        ),
        (REC_QUEUE_OLDEST, controller_gauge("fleet_queue_oldest_age_seconds", "queue")),
        (REC_AGENTS, controller_gauge("fleet_agents", "pool, state")),
        (
            REC_AGENTS_FAILING,
            f"sum by (fleet) ({_rec(REC_AGENTS, fleet, f'state=~{_string(_FAILING)}')})",
        ),
        (
            REC_AGENTS_FAILING_SHARE,
            f"{_rec(REC_AGENTS_FAILING, fleet)} / sum by (fleet) "
            f"({_rec(REC_AGENTS, fleet, f'state=~{_string(_AGENT_STATES)}')})",
        ),
        (REC_EJECTED, controller_gauge("fleet_breaker_ejected_agents", "pool")),
        (REC_EJECTED_CAP, controller_gauge("fleet_breaker_max_ejected_agents", "pool")),
        (REC_RESTARTS, controller_gauge("fleet_control_actor_restarts", "actor")),
        (REC_BURN, controller_gauge("fleet_budget_burn_usd_per_hour", "scope, name")),
        (REC_LIMIT, controller_gauge("fleet_budget_limit_usd", "scope, name")),
        (REC_SHED_RATE, f"sum by (fleet, pool) ({rate('fleet_tasks_shed_total')})"),
        # What admission control refused, of what the pool was asked for: refused plus
        # recorded (a pool that runs nothing and refuses everything shows 1).
        (
            REC_SHED_SHARE,
            f"{_rec(REC_SHED_RATE, fleet)} / ({_rec(REC_SHED_RATE, fleet)} + on (fleet, pool) "
            f"(sum by (fleet, pool) ({_rec(REC_TASKS_RATE, fleet)}) "
            f"or {_rec(REC_SHED_RATE, fleet)} * 0))",
        ),
    ]
    return [{"record": name, "expr": expr} for name, expr in rules]


# -- queue alert rules ------------------------------------------------------------------


def _queue_sum(metric: str, scope: AlertScope, fleet: str) -> str:
    """A per-shard controller gauge, per shard or summed over each queue's shards."""
    per_shard = f"max by (fleet, queue, shard) ({_sel(metric, fleet)})"
    return per_shard if scope is AlertScope.SHARD else f"sum by (fleet, queue) ({per_shard})"


def _queue_rate(metric: str, scope: AlertScope, fleet: str) -> str:
    by = "fleet, queue, shard" if scope is AlertScope.SHARD else "fleet, queue"
    return f"sum by ({by}) (rate({_sel(metric, fleet)}[{RATE_WINDOW}]))"


def _queue_expr(metric: AlertMetric, scope: AlertScope, fleet: str) -> str | None:
    """PromQL for a queue alert metric, per queue or per shard; None if not exported."""
    shard = scope is AlertScope.SHARD
    if metric is AlertMetric.DEPTH:
        if not shard:
            return _rec(REC_QUEUE_DEPTH, fleet)
        return _queue_sum("fleet_queue_depth", scope, fleet)
    if metric is AlertMetric.LEASED:
        if not shard:
            return _rec(REC_QUEUE_LEASED, fleet)
        return _queue_sum("fleet_queue_leased", scope, fleet)
    if metric is AlertMetric.PENDING:
        if not shard:
            return f"({_rec(REC_QUEUE_DEPTH, fleet)} + {_rec(REC_QUEUE_LEASED, fleet)})"
        return (
            f"({_queue_sum('fleet_queue_depth', scope, fleet)} + "
            f"{_queue_sum('fleet_queue_leased', scope, fleet)})"
        )
    if metric is AlertMetric.OLDEST_AGE_S:
        if not shard:
            return _rec(REC_QUEUE_OLDEST, fleet)
        return (
            f"max by (fleet, queue, shard) ({_sel('fleet_queue_oldest_age_seconds', fleet)})"
        )
    rates = {
        AlertMetric.ENQUEUE_PER_S: "fleet_queue_enqueued_total",
        AlertMetric.LEASE_EXPIRIES_PER_S: "fleet_queue_lease_expiries_total",
        AlertMetric.REDELIVERIES_PER_S: "fleet_queue_redeliveries_total",
    }
    if metric in rates:
        return f"({_queue_rate(rates[metric], scope, fleet)})"
    # Balance over the shards' depths, as in-process (fleet.policy.sharding). An empty
    # queue's is 0 there and NaN here (0/0), which passes no comparison: the two differ
    # only for a "<" rule on balance, which no one needs.
    d = _queue_sum("fleet_queue_depth", AlertScope.SHARD, fleet)
    if metric is AlertMetric.SHARD_MAX_OVER_MEAN:
        return f"(max by (fleet, queue) ({d}) / avg by (fleet, queue) ({d}))"
    if metric is AlertMetric.SHARD_CV:
        return f"(stddev by (fleet, queue) ({d}) / avg by (fleet, queue) ({d}))"
    return None  # age percentiles, dequeue and deadline rates: not exported by queue


_UNEXPORTED_WHY = {
    AlertMetric.AGE_P50_S: "no item-age histogram is exported",
    AlertMetric.AGE_P90_S: "no item-age histogram is exported",
    AlertMetric.AGE_P99_S: "no item-age histogram is exported",
    AlertMetric.DEQUEUE_PER_S: "dequeues are not exported (acks are)",
    AlertMetric.DEADLINE_EXCEEDED_PER_S: (
        "deadline failures are counted by pool (ray_fleet_tasks_total), not by queue"
    ),
}


def _duration(seconds: float) -> str:
    """A Prometheus duration: ``5m``, ``90s``, or milliseconds for a fraction."""
    if float(seconds).is_integer():
        s = int(seconds)
        return f"{s // 60}m" if s and s % 60 == 0 else f"{s}s"
    return f"{round(seconds * 1000)}ms"


def _string(text: str) -> str:
    """A PromQL string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _camel(text: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", text) if p)


@dataclass(frozen=True)
class _QueueDefault:
    alert: str
    metric: AlertMetric
    threshold: float
    for_s: float
    severity: str


_QUEUE_DEFAULTS = (
    _QueueDefault(
        "FleetQueueDepthHigh",
        AlertMetric.DEPTH,
        DEFAULT_DEPTH_THRESHOLD,
        DEFAULT_QUEUE_FOR_S,
        "warning",
    ),
    _QueueDefault(
        "FleetQueueOldestItemOld",
        AlertMetric.OLDEST_AGE_S,
        DEFAULT_OLDEST_AGE_S,
        DEFAULT_OLDEST_AGE_FOR_S,
        "warning",
    ),
)


_OF_FLEET = "of fleet {{ $labels.fleet }}"


def _subject(scope: AlertScope, of_fleet: bool = False) -> str:
    of = f" {_OF_FLEET}" if of_fleet else ""
    if scope is AlertScope.SHARD:
        return f"queue {{{{ $labels.queue }}}} shard {{{{ $labels.shard }}}}{of}"
    return f"queue {{{{ $labels.queue }}}}{of}"


def _queue_alert(
    alert: str,
    rule: QueueAlertRule,
    expr: str,
    fleet: str,
) -> dict[str, Any]:
    fmt = "humanizeDuration" if rule.metric is AlertMetric.OLDEST_AGE_S else "humanize"
    cond = f"{expr} {rule.op} {rule.threshold:g}"
    clear = rule.clear_threshold
    if clear is not None and clear != rule.threshold:
        # Hysteresis: once firing, hold while the value still passes clear_threshold.
        on = "fleet, queue, shard" if rule.scope is AlertScope.SHARD else "fleet, queue"
        cond = (
            f"{cond} or ({expr} {rule.op} {clear:g} and on ({on}) "
            f'ALERTS{{alertname="{alert}", alertstate="firing", '
            f"{_fleet_matcher(fleet)}, rule={_string(rule.rule_name)}}})"
        )
    out: dict[str, Any] = {"alert": alert, "expr": cond}
    if rule.for_s:
        out["for"] = _duration(rule.for_s)
    out["labels"] = {"severity": rule.severity, "fleet": fleet, "rule": rule.rule_name}
    out["annotations"] = {
        "summary": f"Fleet {fleet}: {_subject(rule.scope)}: {rule.metric.value} "
        f"{rule.op} {rule.threshold:g}",
        "description": f"{_subject(rule.scope, of_fleet=True)}: {rule.metric.value} is "
        f"{{{{ $value | {fmt} }}}} (alert when {rule.op} {rule.threshold:g}).",
    }
    return out


def _queue_alerts(spec: FleetSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """The queue alerts and a comment line for each spec rule that was skipped."""
    rules = list(spec.queues.alerts)
    alerts: list[dict[str, Any]] = []
    skipped: list[str] = []
    for d in _QUEUE_DEFAULTS:
        rule = next((r for r in rules if r.metric is d.metric), None)
        if rule is None:
            rule = QueueAlertRule(
                metric=d.metric,
                threshold=d.threshold,
                for_s=d.for_s,
                severity=d.severity,  # type: ignore[arg-type]
            )
        else:
            rules.remove(rule)
        expr = _queue_expr(rule.metric, rule.scope, spec.name)
        assert expr is not None
        alerts.append(_queue_alert(d.alert, rule, expr, spec.name))
    for rule in rules:
        expr = _queue_expr(rule.metric, rule.scope, spec.name)
        if expr is None:
            skipped.append(
                f"queues.alerts {rule.rule_name!r} ({rule.scope.value} scope) is not "
                f"rendered: {_UNEXPORTED_WHY[rule.metric]}; fleet's in-process "
                "evaluator still applies it"
            )
            continue
        scope = "Shard" if rule.scope is AlertScope.SHARD else ""
        name = f"FleetQueue{_camel(rule.metric.value)}{scope}"
        alerts.append(_queue_alert(name, rule, expr, spec.name))
    return alerts, skipped


# -- the other alerts -------------------------------------------------------------------


def _alert(
    name: str,
    expr: str,
    for_s: float,
    severity: str,
    fleet: str,
    summary: str,
    description: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {"alert": name, "expr": expr}
    if for_s:
        out["for"] = _duration(for_s)
    out["labels"] = {"severity": severity, "fleet": fleet}
    out["annotations"] = {"summary": f"Fleet {fleet}: {summary}", "description": description}
    return out


def _fleet_alerts(spec: FleetSpec) -> list[dict[str, Any]]:
    fleet = spec.name
    cascade = spec.health.cascade
    target = spec.observability.latency_target_s
    shed = spec.observability.shed_alert_share
    p95 = _rec(REC_LATENCY.format(q="95"), fleet)
    ejected, cap = _rec(REC_EJECTED, fleet), _rec(REC_EJECTED_CAP, fleet)
    scopes = "|".join(BUDGET_SCOPES)
    return [
        _alert(
            "FleetBreakerEjectionsNearCap",
            f"{ejected} >= {EJECTION_NEAR_CAP_SHARE:g} * {cap} and {cap} > 0",
            BREAKER_FOR_S,
            "warning",
            fleet,
            "pool {{ $labels.pool }}: breaker ejections near their cap",
            "{{ $value | humanize }} agents of pool {{ $labels.pool }} "
            f"{_OF_FLEET} are held out by their "
            f"breakers, at least {EJECTION_NEAR_CAP_SHARE:.0%} of the cap on ejections "
            "(resilience.ejection.max_ejected_share): more failures will keep failing "
            "agents in rotation.",
        ),
        _alert(
            "FleetAgentCascade",
            f"{_rec(REC_AGENTS_FAILING_SHARE, fleet)} > {cascade.cascade_share:g} "
            f"and on (fleet) {_rec(REC_AGENTS_FAILING, fleet)} "
            f">= {cascade.min_failing_agents}",
            CASCADE_FOR_S,
            "critical",
            fleet,
            "agents failing in a cascade",
            "{{ $value | humanizePercentage }} of the agents "
            f"{_OF_FLEET} are unhealthy or restarting "
            f"(health.cascade.cascade_share: {cascade.cascade_share:g}); the cascade "
            "guard throttles restarts.",
        ),
        _alert(
            "FleetControlActorRestarted",
            f"increase({_rec(REC_RESTARTS, fleet)}[{CONTROL_RESTART_WINDOW}]) > 0",
            0,
            "warning",
            fleet,
            "control actor {{ $labels.actor }} restarted",
            f"Control actor {{{{ $labels.actor }}}} {_OF_FLEET} restarted in the last "
            f"{CONTROL_RESTART_WINDOW}; its logs and `fleet status` say why.",
        ),
        _alert(
            "FleetBudgetBurnHigh",
            f"{_rec(REC_BURN, fleet, f'scope=~{_string(scopes)}')} > on (fleet, scope, name) "
            f"{_rec(REC_LIMIT, fleet)} * {BURN_FACTOR:g} / 24",
            BURN_FOR_S,
            "warning",
            fleet,
            "budget {{ $labels.scope }} {{ $labels.name }} burning fast",
            "Budget {{ $labels.scope }} {{ $labels.name }} "
            f"{_OF_FLEET} burns "
            "{{ $value | humanize }} USD/h, "
            f"over {BURN_FACTOR:g} x its daily limit / 24: at this rate it runs out in "
            f"less than {24 / BURN_FACTOR:g} hours.",
        ),
        _alert(
            "FleetSheddingHigh",
            f"{_rec(REC_SHED_SHARE, fleet)} > {shed:g}",
            SHED_FOR_S,
            "warning",
            fleet,
            "pool {{ $labels.pool }}: admission control refuses many tasks",
            "Admission control refuses {{ $value | humanizePercentage }} of the tasks "
            f"asked of pool {{{{ $labels.pool }}}} {_OF_FLEET} (over "
            f"observability.shed_alert_share, {shed:g}): it is at its max_agents or "
            "cannot grow fast enough; `fleet status` shows refusals by class.",
        ),
        _alert(
            "FleetTaskLatencyHigh",
            f"{p95} > {target:g}",
            LATENCY_FOR_S,
            "warning",
            fleet,
            "pool {{ $labels.pool }}: p95 task latency over target",
            f"p95 task latency of pool {{{{ $labels.pool }}}} {_OF_FLEET} is "
            "{{ $value | humanize }} s, over "
            f"observability.latency_target_s ({target:g} s).",
        ),
    ]


# -- the rule file --------------------------------------------------------------------


def _render(spec: FleetSpec) -> tuple[dict[str, Any], list[str]]:
    queue_alerts, skipped = _queue_alerts(spec)
    # One group: its rules are evaluated in order, so the alerts read recording rules
    # of the same evaluation, never one interval old.
    group = {
        "name": f"fleet-{spec.name}",
        "rules": [*_recording_rules(spec.name), *queue_alerts, *_fleet_alerts(spec)],
    }
    return {"groups": [group]}, skipped


def render_rules(spec: FleetSpec) -> dict[str, Any]:
    """The Prometheus rule file (recording and alerting rules) for ``spec``'s fleet."""
    return _render(spec)[0]


def render_rules_yaml(spec: FleetSpec) -> str:
    """``render_rules`` as YAML, with a header saying how to regenerate it."""
    rules, skipped = _render(spec)
    header = [
        f"# Prometheus rules for fleet {spec.name!r}: recording rules and alerts.",
        "# Generated from the fleet's spec by `fleet rules SPEC`; do not edit: regenerate",
        "# from your own spec with `fleet rules YOUR_SPEC.yaml --out fleet-rules.yml`.",
        *(f"# Skipped: {line}" for line in skipped),
    ]
    body = yaml.safe_dump(rules, sort_keys=False, width=10_000, allow_unicode=True)
    return "\n".join(header) + "\n" + body


# -- dashboards and queries -------------------------------------------------------------

RATE_INTERVAL = "1m"
_ALL_SESSIONS = ".*"
_ALL_FLEETS = ".*"
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    "by without on ignoring group_left group_right and or unless offset bool inf nan "
    "sum min max avg count stddev stdvar topk bottomk quantile count_values group".split()
)


def _panels(panels: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # a row's collapsed panels


def panel_queries(dashboard_json: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target of a Grafana dashboard, in order."""
    return [
        (str(p.get("title", "")), str(t["expr"]))
        for p in _panels(dashboard_json.get("panels", []))
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def _regex_literal(text: str) -> str:
    """``text`` matched literally by a PromQL regex inside a double-quoted string."""
    return re.sub(r"([.+*?()\[\]{}|^$])", r"\\\\\1", text).replace('"', '\\"')


def instantiate(expr: str, session: str | None = None, fleet: str | None = None) -> str:
    """A dashboard query as plain PromQL: Grafana's variables substituted.

    ``$__rate_interval`` (and ``$__interval``) become ``1m``; ``$SessionName`` the Ray
    session given (matched literally), or any (``.*``, which also matches the series of
    the ingress's ``/metrics``: they carry no session label) when None; ``$fleet`` the
    fleet given (its spec's name, matched literally), or any (``.*``) when None.
    """
    sessions = _ALL_SESSIONS if session is None else _regex_literal(session)
    fleets = _ALL_FLEETS if fleet is None else _regex_literal(fleet)
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", RATE_INTERVAL)
    out = out.replace("${SessionName}", sessions).replace("$SessionName", sessions)
    out = out.replace("${fleet}", fleets).replace("$fleet", fleets)
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names (series selectors) a PromQL query reads.

    A small scanner, enough for the queries fleet writes: string literals, label
    matchers (``{...}``), ranges (``[5m]``), ``by``/``on``-style label lists and function
    names are left out; what remains is metric names.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(
        r"(?<![A-Za-z0-9_:.])[0-9][0-9.]*(?:[eE][-+]?[0-9]+)?(?:ms|[smhdwy])?", " ", text
    )
    out = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if not (rest.startswith("(") or word in _KEYWORDS):  # not a function, operator
            out.add(word)
    return out


def exported_series_names() -> set[str]:
    """Every series name Ray exports for the catalog (histograms: bucket, sum, count)."""
    out = set()
    for d in CATALOG.values():
        if d.kind is Kind.HISTOGRAM:
            out |= {d.exported + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(d.exported)
    return out


def recording_rule_names(rules: Mapping[str, Any]) -> set[str]:
    """The names the recording rules of a rule file (``render_rules``) record."""
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


__all__ = [
    "BURN_FACTOR",
    "DEFAULT_DEPTH_THRESHOLD",
    "DEFAULT_OLDEST_AGE_S",
    "exported_series_names",
    "instantiate",
    "metric_names",
    "panel_queries",
    "recording_rule_names",
    "render_rules",
    "render_rules_yaml",
]
