"""The demo's workload at a small size: every task accounted for, autoscaling visible."""

from __future__ import annotations

import pytest

from fleet.cli.demo import demo_spec_path, run_workload
from fleet.spec import load_spec

pytestmark = pytest.mark.ray


def test_demo_accounts_for_every_task_and_scales(ray_cluster):
    spec = load_spec(demo_spec_path())
    out = run_workload(spec, 3_000, seed=1, show=False)
    assert out["lost"] == 0 and out["ledger_lost"] == 0
    assert out["completed"] + out["failed"] == out["submitted"] == 3_000
    # The support agent's simulated upstream error is retried (unknown errors are, by
    # default); what is recorded is the last attempt, or a retry the budget refused.
    assert out["failed"] > 0
    assert set(out["failure_reasons"]) <= {"max_attempts", "retry_budget_exhausted"}, out
    assert all("simulated upstream error" in e for e in out["sample_errors"])
    floor = sum(p.autoscaling.min_agents for p in spec.pools)
    assert out["agents"]["start"] == floor and out["agents"]["end"] == floor
    assert out["agents"]["max"] > floor, "a deep queue must raise the agent count"
    assert out["latency_s"]["p50"] <= out["latency_s"]["p95"] <= out["latency_s"]["p99"]
