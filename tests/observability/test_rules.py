"""The Prometheus rules and Grafana dashboards in ``monitoring/``: rendered from the spec
(the committed rule file is the demo spec's, byte for byte), valid to promtool, every
alert fired and cleared by ``fleet-rules.test.yml``, and every query reading only the
metrics fleet exports (``fleet.observability.metrics.CATALOG``) or the recording rules,
of one fleet (the ``fleet`` label: the rules' ``fleet="<spec.name>"``, the dashboards'
``$fleet`` variable) and grouped by fleet."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.cli.main import main
from fleet.observability.rules import (
    exported_series_names,
    instantiate,
    metric_names,
    panel_queries,
    recording_rule_names,
    render_rules,
    render_rules_yaml,
)
from fleet.spec import FleetSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "fleet" / "examples" / "demo.yaml"
PROMETHEUS = ROOT / "monitoring" / "prometheus"
RULES_FILE = PROMETHEUS / "fleet-rules.yml"
RULES_TESTS = PROMETHEUS / "fleet-rules.test.yml"
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana").glob("*.json"))
FALLBACKS = ("vector(0)", "absent(")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def spec_with(tmp_path: Path, **sections: dict[str, Any]) -> FleetSpec:
    """The demo spec with ``sections`` merged into its top-level sections."""
    data = yaml.safe_load(DEMO_SPEC.read_text())
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def alerts_of(rules: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                out.setdefault(rule["alert"], []).append(rule)
    return out


def demo_rules() -> dict[str, Any]:
    return render_rules(load_spec(DEMO_SPEC))


# A series selector of a fleet metric or recording rule, with its matchers if any.
_SELECTOR = re.compile(r"\b(ray_fleet_[A-Za-z0-9_]+|fleet:[A-Za-z0-9_:]+)(\{[^}]*\})?")
_AGGREGATION = re.compile(r"\b(?:by|on) \(([^)]*)\)")


def selectors(expr: str) -> list[tuple[str, str]]:
    """(name, matchers) of every fleet selector of a query ("" for no matchers)."""
    return [(m.group(1), m.group(2) or "") for m in _SELECTOR.finditer(expr)]


def assert_per_fleet(expr: str, matcher: str) -> None:
    """Every fleet selector of ``expr`` carries ``matcher``; every ``by``/``on`` keeps
    the fleet label (``le`` lists of histograms aside, none drop it)."""
    sels = selectors(expr)
    assert sels, expr
    for name, matchers in sels:
        assert matcher in matchers, (name, expr)
    for labels in _AGGREGATION.findall(expr):
        assert labels.split(", ")[0] == "fleet", expr


# -- the committed rule file ------------------------------------------------------------


def test_committed_rules_are_the_demo_specs():
    # Regenerate after a change to the rules: fleet rules fleet/examples/demo.yaml
    #   --out monitoring/prometheus/fleet-rules.yml
    assert RULES_FILE.read_text() == render_rules_yaml(load_spec(DEMO_SPEC))


def test_required_alerts_with_severity_and_annotations():
    alerts = alerts_of(demo_rules())
    assert set(alerts) == {
        "FleetQueueDepthHigh",
        "FleetQueueOldestItemOld",
        "FleetBreakerEjectionsNearCap",
        "FleetAgentCascade",
        "FleetControlActorRestarted",
        "FleetBudgetBurnHigh",
        "FleetTaskLatencyHigh",
        "FleetSheddingHigh",
    }
    assert alerts["FleetSheddingHigh"][0]["expr"].endswith("> 0.1")  # shed_alert_share
    for name, rules in alerts.items():
        for rule in rules:
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert alerts["FleetQueueDepthHigh"][0]["expr"].endswith("> 10000")
    assert alerts["FleetQueueOldestItemOld"][0]["expr"].endswith("> 300")
    for name, rules in alerts.items():
        for rule in rules:
            assert rule["labels"]["fleet"] == "demo", name
            assert "of fleet {{ $labels.fleet }}" in rule["annotations"]["description"], name


def test_every_rule_reads_only_its_fleets_series_and_groups_by_fleet():
    for group in demo_rules()["groups"]:
        for rule in group["rules"]:
            assert_per_fleet(rule["expr"], 'fleet="demo"')
    text = RULES_FILE.read_text()
    assert "by (pool" not in text and "by (queue" not in text and "sum(" not in text


def test_a_spec_named_x_renders_its_own_fleet_matcher(tmp_path):
    data = yaml.safe_load(DEMO_SPEC.read_text())
    data["name"] = "x"
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    rules = render_rules(load_spec(path))
    assert rules["groups"][0]["name"] == "fleet-x"
    for rule in rules["groups"][0]["rules"]:
        assert_per_fleet(rule["expr"], 'fleet="x"')
        assert 'fleet="demo"' not in rule["expr"], rule["expr"]
        if "alert" in rule:
            assert rule["labels"]["fleet"] == "x"


def test_rules_read_only_exported_metrics_and_no_fallbacks():
    rules = demo_rules()
    known = exported_series_names() | recording_rule_names(rules)
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            assert not any(f in expr for f in FALLBACKS), expr
            names = metric_names(expr)
            assert names, expr
            assert names <= known, (expr, names - known)


@needs_promtool
def test_promtool_check_rules_reports_nothing():
    out = promtool("check", "rules", RULES_FILE.name, cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    assert "WARNING" not in out.stdout + out.stderr
    assert "FAILED" not in out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", RULES_TESTS.name, cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_example_prometheus_config_is_valid():
    out = promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES_FILE.name]
    sd = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_every_alert_fires_and_clears_in_the_unit_tests():
    tests = yaml.safe_load(RULES_TESTS.read_text())
    assert tests["rule_files"] == [RULES_FILE.name]
    fires_then_clears = set()
    for case in tests["tests"]:
        by_alert: dict[str, list[tuple[float, bool]]] = {}
        for check in case.get("alert_rule_test", []):
            when = _minutes(check["eval_time"])
            by_alert.setdefault(check["alertname"], []).append(
                (when, bool(check["exp_alerts"]))
            )
        for name, checks in by_alert.items():
            fired = [t for t, firing in checks if firing]
            if fired and any(not firing and t > min(fired) for t, firing in checks):
                fires_then_clears.add(name)
    missing = set(alerts_of(demo_rules())) - fires_then_clears
    assert not missing, f"alerts never fired then cleared in {RULES_TESTS.name}: {missing}"


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0}
    return float(duration[:-1]) * units[duration[-1]]


# -- the spec flows through ---------------------------------------------------------------


def test_spec_thresholds_replace_the_defaults(tmp_path):
    spec = spec_with(
        tmp_path,
        queues={
            "alerts": [
                "depth > 5000",
                {
                    "metric": "oldest_age_s",
                    "threshold": 120,
                    "for_s": 30,
                    "severity": "critical",
                },
            ]
        },
        health={"cascade": {"cascade_share": 0.25, "min_failing_agents": 3}},
        observability={"latency_target_s": 12.5},
    )
    alerts = alerts_of(render_rules(spec))
    (depth,) = alerts["FleetQueueDepthHigh"]
    assert depth["expr"] == 'fleet:queue_depth:sum{fleet="demo"} > 5000'
    assert "for" not in depth  # the rule's for_s is 0
    assert depth["labels"]["rule"] == "depth > 5000"
    (age,) = alerts["FleetQueueOldestItemOld"]
    assert age["expr"].endswith("> 120")
    assert age["for"] == "30s"
    assert age["labels"]["severity"] == "critical"
    (cascade,) = alerts["FleetAgentCascade"]
    assert "> 0.25 " in cascade["expr"] and cascade["expr"].endswith(">= 3")
    (latency,) = alerts["FleetTaskLatencyHigh"]
    assert latency["expr"].endswith("> 12.5")
    assert "5000" in render_rules_yaml(spec)


def test_other_spec_rules_become_alerts_or_are_skipped_with_a_comment(tmp_path):
    spec = spec_with(
        tmp_path,
        queues={
            "alerts": [
                {"metric": "leased", "threshold": 100, "for_s": 90, "scope": "shard"},
                {
                    "metric": "enqueue_per_s",
                    "op": "<",
                    "threshold": 1,
                    "name": "intake stalled",
                },
                "shard_cv > 0.5",
                "age_p90_s > 60",
                "deadline_exceeded_per_s > 1",
            ]
        },
    )
    rules = render_rules(spec)
    alerts = alerts_of(rules)
    (leased,) = alerts["FleetQueueLeasedShard"]
    assert leased["expr"] == (
        'max by (fleet, queue, shard) (ray_fleet_queue_leased{fleet="demo"}) > 100'
    )
    assert leased["for"] == "90s"
    (stalled,) = alerts["FleetQueueEnqueuePerS"]
    assert stalled["labels"]["rule"] == "intake stalled"
    assert stalled["expr"].endswith("< 1")
    assert "stddev by (fleet, queue)" in alerts["FleetQueueShardCv"][0]["expr"]
    assert not any("age_p90" in a or "DeadlineExceeded" in a for a in alerts)
    text = render_rules_yaml(spec)
    assert "# Skipped: queues.alerts 'age_p90_s > 60'" in text
    assert "# Skipped: queues.alerts 'deadline_exceeded_per_s > 1'" in text
    known = exported_series_names() | recording_rule_names(rules) | {"ALERTS"}
    for rs in alerts.values():
        for r in rs:
            assert metric_names(r["expr"]) <= known, r["expr"]
            assert_per_fleet(r["expr"], 'fleet="demo"')


@needs_promtool
def test_clear_threshold_holds_the_alert_until_the_value_passes_it(tmp_path):
    spec = spec_with(
        tmp_path,
        queues={
            "alerts": [
                {"metric": "depth", "threshold": 100, "clear_threshold": 50, "name": "deep"}
            ]
        },
    )
    (tmp_path / "rules.yml").write_text(render_rules_yaml(spec))
    firing = [
        {
            "exp_labels": {
                "severity": "warning",
                "fleet": "demo",
                "rule": "deep",
                "queue": "support",
            },
            "exp_annotations": {
                "summary": "Fleet demo: queue support: depth > 100",
                "description": "queue support of fleet demo: depth is {v} (alert when > 100).",
            },
        }
    ]

    def expect(value: int) -> list[dict[str, Any]]:
        out = json.loads(json.dumps(firing))
        out[0]["exp_annotations"]["description"] = out[0]["exp_annotations"][
            "description"
        ].format(v=value)
        return out

    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'ray_fleet_queue_depth{fleet="demo", queue="support", '
                        'shard="0", WorkerId="w1"}',
                        # 80 after 150: under the threshold, over clear_threshold.
                        "values": "150 150 80 80 80 40 40 80 80",
                    },
                    {
                        # Another fleet's queue of the same name: never held by demo's
                        # firing alert.
                        "series": 'ray_fleet_queue_depth{fleet="other", queue="support", '
                        'shard="0", WorkerId="w1"}',
                        "values": "80x8",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "1m",
                        "alertname": "FleetQueueDepthHigh",
                        "exp_alerts": expect(150),
                    },
                    {
                        "eval_time": "4m",
                        "alertname": "FleetQueueDepthHigh",
                        "exp_alerts": expect(80),
                    },
                    {"eval_time": "5m", "alertname": "FleetQueueDepthHigh", "exp_alerts": []},
                    # Back at 80 without passing 100 first: stays quiet.
                    {"eval_time": "8m", "alertname": "FleetQueueDepthHigh", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    out = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the CLI -----------------------------------------------------------------------------


def test_cli_prints_and_writes_the_rules(tmp_path, capsys):
    assert main(["rules", str(DEMO_SPEC)]) == 0
    assert capsys.readouterr().out == RULES_FILE.read_text()
    out = tmp_path / "rules.yml"
    assert main(["rules", str(DEMO_SPEC), "--out", str(out)]) == 0
    assert out.read_text() == RULES_FILE.read_text()


def test_cli_bad_spec_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npools: nope\n")
    assert main(["rules", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("fleet: ")


# -- the dashboards -----------------------------------------------------------------------


def test_there_are_dashboards():
    names = {p.name for p in DASHBOARDS}
    assert "fleet-overview.json" in names and len(names) >= 2


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_with_unique_panel_ids(path):
    dash = json.loads(path.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["SessionName"]["allValue"] == ".*"
    fleet = variables["fleet"]
    assert fleet["type"] == "query"
    assert fleet["query"]["query"] == "label_values(ray_fleet_tasks_total, fleet)"
    assert fleet["definition"] == fleet["query"]["query"]
    assert fleet["allValue"] == ".*" and fleet["includeAll"] and fleet["multi"]
    assert path.read_text() == json.dumps(dash, indent=2) + "\n"
    for panel in dash["panels"]:
        assert panel["datasource"] == "${datasource}"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panel_queries_read_only_exported_metrics(path):
    known = exported_series_names() | recording_rule_names(demo_rules())
    queries = panel_queries(json.loads(path.read_text()))
    assert queries
    for title, expr in queries:
        assert not any(f in expr for f in FALLBACKS), (title, expr)
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= known, (title, names - known)
        assert 'SessionName=~"$SessionName"' in expr, title
        assert "$" not in instantiate(expr), (title, instantiate(expr))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panel_queries_select_and_group_by_fleet(path):
    dash = json.loads(path.read_text())
    for title, expr in panel_queries(dash):
        for name, matchers in selectors(expr):
            assert 'fleet=~"$fleet", SessionName=~"$SessionName"' in matchers, (title, name)
        assert_per_fleet(expr, 'fleet=~"$fleet"')
    for panel in dash["panels"]:
        for target in panel["targets"]:
            assert target["legendFormat"].startswith("{{fleet}} "), panel["title"]


def test_the_overview_covers_every_concern():
    queries = panel_queries(
        json.loads((ROOT / "monitoring/grafana/fleet-overview.json").read_text())
    )
    read = set().union(*(metric_names(e) for _, e in queries))
    for metric in (
        "ray_fleet_tasks_total",
        "ray_fleet_task_latency_seconds_bucket",
        "ray_fleet_task_queue_wait_seconds_bucket",
        "ray_fleet_task_execution_seconds_bucket",
        "ray_fleet_dispatch_overhead_seconds_bucket",
        "ray_fleet_queue_depth",
        "ray_fleet_queue_oldest_age_seconds",
        "ray_fleet_in_flight",
        "ray_fleet_agents",
        "ray_fleet_hosts",
        "ray_fleet_breaker_ejected_agents",
        "ray_fleet_breaker_max_ejected_agents",
        "ray_fleet_task_retries_total",
        "ray_fleet_tokens_total",
        "ray_fleet_cost_usd_total",
        "ray_fleet_budget_remaining_usd",
        "ray_fleet_budget_burn_usd_per_hour",
        "ray_fleet_control_actor_restarts",
        "ray_fleet_alerts_firing",
    ):
        assert metric in read, metric


@needs_promtool
def test_panel_queries_parse(tmp_path):
    # promtool has no offline query parser; a rule file of the queries is parsed whole.
    queries = [e for p in DASHBOARDS for _, e in panel_queries(json.loads(p.read_text()))]
    rules = {
        "groups": [
            {
                "name": "panels",
                "rules": [
                    {
                        "record": f"panel:query_{i}",
                        "expr": instantiate(e, "session_2026_1", "demo"),
                    }
                    for i, e in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", "panels.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the helpers ----------------------------------------------------------------------------


def test_instantiate_substitutes_grafana_variables():
    expr = 'sum(rate(ray_fleet_tasks_total{SessionName=~"$SessionName"}[$__rate_interval]))'
    assert instantiate(expr) == 'sum(rate(ray_fleet_tasks_total{SessionName=~".*"}[1m]))'
    assert instantiate(expr, "session_2026-12-07_1.5") == (
        'sum(rate(ray_fleet_tasks_total{SessionName=~"session_2026-12-07_1\\\\.5"}[1m]))'
    )
    expr = (
        'sum by (fleet) (ray_fleet_tasks_total{fleet=~"$fleet", SessionName=~"$SessionName"})'
        ' + on (fleet) ray_fleet_hosts{fleet=~"${fleet}"}'
    )
    assert instantiate(expr) == (
        'sum by (fleet) (ray_fleet_tasks_total{fleet=~".*", SessionName=~".*"})'
        ' + on (fleet) ray_fleet_hosts{fleet=~".*"}'
    )
    assert instantiate(expr, "s1", "eu.prod") == (
        'sum by (fleet) (ray_fleet_tasks_total{fleet=~"eu\\\\.prod", SessionName=~"s1"})'
        ' + on (fleet) ray_fleet_hosts{fleet=~"eu\\\\.prod"}'
    )


def test_metric_names_leaves_out_labels_functions_and_numbers():
    expr = (
        'histogram_quantile(0.95, sum by (pool, le) (rate(a_bucket{pool="x"}[5m]))) '
        "> on (pool) group_left b offset 5m * 1e3 and ignoring (le) c:d:e"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:d:e"}
