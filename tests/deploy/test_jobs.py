"""jobs/load.py on the session cluster: it starts the fleet of a spec that is not
running, loads it, reports from the ledger, and tears down only what it started."""

from __future__ import annotations

import json

import pytest
import ray
import yaml

from jobs.load import main, make_load, parse_args

SPEC = {
    "name": "loadjob",
    "namespace": "fleet-test-loadjob",
    "queues": {"shards": 1},
    "pools": [
        {
            "name": "echo",
            "capability": "echo",
            "agent_class": "fleet.agents.testing:SleepAgent",
            "agent_kwargs": {"delay_s": 0.01},
            "cpus_per_host": 0,
            "autoscaling": {"min_agents": 20, "max_agents": 20},
        }
    ],
}


def test_arguments_are_checked():
    for bad in (["--tasks", "0"], ["--rate", "-1"], ["--payload", "{nope"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2


def test_workload_is_the_demo_mix_for_the_demo_fleet_else_round_robin():
    demo = make_load(["support", "checkout", "analytics"], 100, 0, {})
    assert {t["capability"] for t in demo} == {"support", "checkout", "analytics"}
    other = make_load(["a", "b"], 4, 0, {"x": 1})
    assert [t["capability"] for t in other] == ["a", "b", "a", "b"]
    assert all(t["payload"] == {"x": 1} for t in other)


@pytest.mark.ray
def test_load_job_starts_a_fleet_from_a_spec_and_stops_it(ray_cluster, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["--spec", str(spec), "--tasks", "200", "--payload", '{"n": 1}']) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["started_fleet"] is True and summary["fleet"] == "loadjob"
    assert (summary["submitted"], summary["completed"], summary["lost"]) == (200, 200, 0)
    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == SPEC["namespace"]
    ]
    assert left == [], "a fleet the job started is torn down after it"
