"""fleet's metrics through a real Prometheus: the session cluster exports them through
Ray's metrics agents; Prometheus (Debian package ``prometheus``) scrapes the targets of
Ray's service-discovery file, with fleet's rules loaded. A workload completes tasks,
fails some on a faulty agent until its breaker trips, runs out of a budget, fires an
in-process queue alert and survives a killed dispatcher. Then, through Prometheus's
HTTP API: the task counter by outcome equals the ledger's counts, the latency
histogram counts every completed task, and every panel query of the Grafana dashboards
returns at least one series that changed during the workload."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.observability import scrape
from fleet.observability.rules import instantiate, panel_queries, render_rules
from fleet.task import TaskStatus
from tests.utils import eventually, make_spec, pool

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "monitoring" / "grafana").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")
SHIPPED_CONFIG = REPO / "monitoring" / "prometheus" / "prometheus.yml"
SD_FILE = "prom_metrics_service_discovery.json"
WORK, PAID = "obswork", "obspaid"  # pool names no other test uses: their own series
PRICES = {"test-model": {"input_usd_per_mtok": 3.0, "output_usd_per_mtok": 7.0}}
TASK_USD = 0.01  # 1000 input + 1000 output tokens of test-model
AFFORDABLE = 8  # paid tasks the pool's daily budget covers; the rest are refused
WORK_TASKS, PAID_TASKS = 400, 20


def _spec():
    return make_spec(
        pool(
            WORK,
            capability=WORK,
            agent_class="fleet.agents.faulty:FaultyAgent",
            # Agent 0 fails every task (retryable): its breaker opens, the retries of
            # its tasks go to the others, and some fail for good after two tries.
            agent_kwargs={"delay_s": 0.005, "bad_agents": [0], "fail_rate": 1.0, "seed": 1},
            agents_per_host=10,
            autoscaling={"min_agents": 10, "max_agents": 10},
        ),
        pool(
            PAID,
            capability=PAID,
            agent_class="fleet.agents.testing:PricedAgent",
            agent_kwargs={"delay_s": 0.005},
            agents_per_host=4,
            autoscaling={"min_agents": 4, "max_agents": 4},
        ),
        name="obsfleet",
        namespace="fleet-obs",
        # A burst deeper than 50 fires this in-process alert (the alerts panel).
        queues={"alerts": ["depth > 50"]},
        resilience={
            "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
            "agent_breaker": {"window_calls": 10, "min_calls": 4, "open_duration_s": 30},
        },
        budgets={
            "prices": PRICES,
            "task_estimates": {
                PAID: {"model": "test-model", "input_tokens": 1000, "output_tokens": 1000}
            },
            "pools": {PAID: {"daily_usd": AFFORDABLE * TASK_USD}},
        },
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prom:
    """A Prometheus on loopback scraping Ray's targets every second, stopped by pid."""

    def __init__(self, tmp: Path, sd_file: Path, rules: dict[str, Any]):
        self.port = _free_port()
        (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        # The shipped example config, scraping every second, on this session's
        # service-discovery file and with this spec's rules.
        config = yaml.safe_load(SHIPPED_CONFIG.read_text())
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(tmp / "rules.yml")]
        (job,) = config["scrape_configs"]
        (sd,) = job["file_sd_configs"]
        assert sd["files"][0].endswith(SD_FILE)  # Ray's link to the session's file
        sd["files"] = [str(sd_file)]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        eventually(self._ready, 30, 0.2, "Prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "Prometheus exited; see its log"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus(ray_cluster, tmp_path):
    if PROMETHEUS is None:
        pytest.skip(
            "prometheus not installed (Debian package prometheus; .ci/run installs it)"
        )
    import ray

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    sd_file = eventually(
        lambda: (session_dir / SD_FILE) if (session_dir / SD_FILE).exists() else None,
        30,
        0.2,
        "Ray's Prometheus service-discovery file",
    )
    prom = Prom(tmp_path, sd_file, render_rules(_spec()))
    yield prom
    prom.stop()


def _changed(series: dict[str, Any], start: float, step: float) -> bool:
    """Values that moved, or a series that appeared after the window opened."""
    values = series["values"]
    first_t = float(values[0][0])
    return len({v for _, v in values}) > 1 or first_t > start + 2 * step


def test_prometheus_sees_what_the_ledger_recorded_and_every_panel_moves(
    start_fleet, prometheus
):
    import ray

    session = ray.get_runtime_context().get_session_name()
    sel = f'SessionName="{session}"'
    fc = start_fleet(_spec())
    t_start = time.time()
    ids = fc.submit(
        [{"capability": WORK, "payload": {"n": i}} for i in range(WORK_TASKS)]
    ).accepted
    # A control actor dies and comes back (the restarts panel); the fleet carries on.
    from fleet.runtime.names import Names

    ray.kill(
        ray.get_actor(Names("obsfleet").dispatcher, namespace="fleet-obs"), no_restart=False
    )
    ids += fc.submit(
        [
            {"capability": PAID, "payload": {"n": i, "tenant": f"t{i}"}}
            for i in range(PAID_TASKS)
        ]
    ).accepted
    assert fc.wait(ids, timeout_s=120) == []
    results = fc.results(ids)
    ledger = Counter(
        ("completed" if r.status is TaskStatus.COMPLETED else "failed") for r in results if r
    )
    reasons = Counter(r.reason for r in results if r and r.status is TaskStatus.FAILED)
    assert ledger["failed"] > 0 and reasons["budget_exhausted"] == PAID_TASKS - AFFORDABLE
    assert sum(ledger.values()) == len(ids)

    pools = f'fleet="obsfleet",pool=~"{WORK}|{PAID}"'
    want = dict(ledger)
    eventually(
        lambda: (
            prometheus.by(
                f"sum by (outcome) (ray_fleet_tasks_total{{{sel},{pools}}})", "outcome"
            )
            == want
        ),
        30,
        0.5,
        f"Prometheus's task counts by outcome to equal the ledger's {want}",
    )
    by_reason = prometheus.by(
        f'sum by (reason) (ray_fleet_tasks_total{{{sel},{pools},outcome="failed"}})', "reason"
    )
    assert by_reason == dict(reasons)
    count = f'ray_fleet_task_latency_seconds_count{{{sel},{pools},outcome="completed"}}'
    completed = prometheus.by(f"sum by (outcome) ({count})", "outcome")
    assert completed == {"completed": ledger["completed"]}
    # What the ingress's /metrics serves (Ray's agents, this session's fleet families)
    # passes promtool's lint.
    text = fc.metrics_text()
    assert scrape.total(text, "ray_fleet_tasks_total", pool=WORK) > 0
    assert "# TYPE ray_fleet_task_latency_seconds histogram" in text
    lint = subprocess.run(
        [str(Path(PROMETHEUS).with_name("promtool")), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), lint.stdout + lint.stderr

    # The breaker opened on the faulty agent, the dispatcher's restart was counted.
    eventually(
        lambda: prometheus.query(
            f'sum(ray_fleet_breaker_transitions_total{{{sel},pool="{WORK}",state="open"}}) > 0'
        ),
        15,
        0.5,
        "a breaker transition to open",
    )
    eventually(
        lambda: prometheus.query(f"max(ray_fleet_control_actor_restarts{{{sel}}}) > 0"),
        15,
        0.5,
        "the dispatcher's restart in the restarts gauge",
    )

    # Every panel of every dashboard: at least one series that moved in the run.
    t_end = time.time()
    eventually(  # one more scrape past the end of the run
        lambda: float(prometheus.query("max(timestamp(up))")[0]["value"][1]) > t_end + 1,
        15,
        0.25,
        "a scrape after the run",
    )
    assert DASHBOARDS, "monitoring/grafana/ holds the dashboards"
    still: list[str] = []
    checked = 0
    for path in DASHBOARDS:
        for title, expr in panel_queries(json.loads(path.read_text())):
            q = instantiate(expr, session, fleet="obsfleet")
            assert "vector(0)" not in q and "absent(" not in q, (path.name, title, q)
            data = prometheus.api("query_range", query=q, start=t_start - 5, end=t_end, step=1)
            checked += 1
            if not any(_changed(s, t_start - 5, 1) for s in data["result"]):
                still.append(f"{path.name}: {title}: {q}")
    assert checked >= 10
    assert still == [], "panels with no series that changed:\n" + "\n".join(still)
