"""`ray job submit ... -- fleet run SPEC.yaml --detach` on a `ray start --head` cluster,
then `fleet submit`, `fleet status`, `fleet list` and `fleet stop --drain` from other
processes: the fleet outlives the job that started it and is managed from anywhere
that can reach the cluster. The driver joins through `RAY_ADDRESS` (as Ray's job
manager sets it), never patching Ray.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.deploy._cluster import BIN, REPO, LocalCluster

# A minute or so on two cores: in `make test-slow`, which CI runs after `make test`.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

JOB_TIMEOUT_S = 240
CLI_TIMEOUT_S = 180
TASKS = 40


def _json(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def test_a_job_starts_a_detached_fleet_that_other_processes_use_and_stop(tmp_path):
    spec = tmp_path / "jobfleet.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "jobfleet",
                "namespace": "fleet-jobfleet",
                "queues": {"shards": 1, "storage": {"directory": str(tmp_path / "state")}},
                "pools": [
                    {
                        "name": "work",
                        "capability": "work",
                        "agent_class": "fleet.agents.testing:SleepAgent",
                        "agent_kwargs": {"delay_s": 0.01},
                        "agents_per_host": 2,
                        "cpus_per_host": 0,
                        "autoscaling": {"min_agents": 2, "max_agents": 2},
                    }
                ],
            }
        )
    )
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"capability": "work", "id": f"t{i}", "payload": {"i": i}}) + "\n"
            for i in range(TASKS)
        )
    )
    cluster = LocalCluster(num_cpus=2).start()
    try:
        fleet = str(BIN / "fleet")
        job = cluster.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                cluster.dashboard_url,
                "--working-dir",
                str(REPO),
                "--",
                "fleet",
                "run",
                str(spec),
                "--detach",
                "--json",
            ],
            timeout_s=JOB_TIMEOUT_S,
        )
        assert job.returncode == 0, job.stderr[-3000:]
        assert '"state": "running"' in job.stdout, job.stdout[-2000:]
        # The job is over; the fleet is not. Another process finds it as the only one.
        sub = cluster.run([fleet, "submit", str(tasks), "--wait", "--json"], CLI_TIMEOUT_S)
        assert sub.returncode == 0, sub.stderr[-3000:]
        report = _json(sub.stdout)
        assert report["fleet"] == "jobfleet" and report["missing"] == 0, report
        status = cluster.run([fleet, "status", "--json"], CLI_TIMEOUT_S)
        assert status.returncode == 0, status.stderr[-3000:]
        st = _json(status.stdout)
        assert st["ledger"]["recorded"] >= TASKS and "work" in st["pools"]
        assert st["dashboard_url"] == cluster.dashboard_url  # what `fleet status` prints
        listed = _json(cluster.run([fleet, "list", "--json"], CLI_TIMEOUT_S).stdout)
        assert [(f["fleet"], f["state"]) for f in listed["fleets"]] == [
            ("jobfleet", "running")
        ]
        stop = cluster.run([fleet, "stop", "jobfleet", "--drain", "--json"], CLI_TIMEOUT_S)
        assert stop.returncode == 0, stop.stderr[-3000:]
        assert _json(stop.stdout)["drained"] is True
        after = cluster.run([fleet, "list", "--json"], CLI_TIMEOUT_S)
        assert _json(after.stdout) == {"fleets": []}
        gone = cluster.run([fleet, "status", "--fleet", "jobfleet"], CLI_TIMEOUT_S)
        assert gone.returncode == 3, gone.stderr
        assert gone.stderr.strip().splitlines() == [
            "fleet: no fleet named 'jobfleet' runs on this cluster "
            "(start one with `fleet run SPEC`)"
        ]
    finally:
        cluster.stop()
