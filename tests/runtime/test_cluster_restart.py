"""Whole-cluster restart: a fleet's cluster is killed (every process of it, by PID) a
third of the way into 20,000 tasks, a new cluster is started and the same spec is run on
the same storage directory: pending tasks continue, nothing is lost, and every outcome
recorded before the stop reads the same after it.

The clusters are the test's own (``ray start --head`` with private temp dirs, see
tests/deploy/_cluster.py), stopped by their own process ids, never by ``ray stop``.
"""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from fleet.spec import parse_spec
from tests.deploy._cluster import LocalCluster

pytestmark = pytest.mark.slow
TASKS = 20_000


@pytest.mark.timeout(600)
def test_a_fleet_survives_a_whole_cluster_restart(tmp_path):
    spec = parse_spec(
        {
            "name": "restart",
            "namespace": f"fleet-restart-{uuid.uuid4().hex[:6]}",
            "pools": [
                {
                    "name": "work",
                    "capability": "work",
                    "agent_class": "fleet.agents.testing:SleepAgent",
                    "agents_per_host": 250,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": 250, "max_agents": 250},
                }
            ],
            "queues": {"storage": {"directory": str(tmp_path / "storage")}},
        }
    )
    spec_file, state = tmp_path / "spec.json", tmp_path / "state.json"
    spec_file.write_text(spec.model_dump_json())
    worker = [sys.executable, "-m", "tests.runtime.cluster_restart_worker"]
    args = [str(spec_file), str(state), str(TASKS)]

    first = LocalCluster(num_cpus=2, dashboard=False).start()
    try:
        out = first.run([*worker, "first", *args], timeout_s=240)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        first.stop()  # kill -9 of every process of that cluster: no goodbye
    recorded_before = int(out.stdout.split("RECORDED ")[1].split()[0])
    assert TASKS // 3 <= recorded_before < TASKS, recorded_before

    second = LocalCluster(num_cpus=2, dashboard=False).start()
    try:
        out = second.run([*worker, "second", *args], timeout_s=300)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        second.stop()
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nwhole-cluster restart: {report}")
    assert report["lost"] == 0 and report["recorded"] == TASKS, report
    assert report["recorded_before_stop"] == recorded_before
    assert report["changed"] == 0, "outcomes recorded before the stop changed"
    assert report["rerun_after_recorded"] == 0, "tasks recorded before the stop ran again"
