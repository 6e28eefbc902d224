"""A running fleet changed in place and stopped, on the session cluster: `fleet apply`
raises max_agents, changes the router and an agent kwarg and adds a pool while tasks
run (none lost), refuses a change it cannot make (naming the field, changing nothing);
`fleet list` shows it; `fleet stop --drain` stops it once nothing is queued."""

from __future__ import annotations

import json
import threading

import pytest
import ray
import yaml

from fleet.cli.main import main
from fleet.runtime.client import FleetClient
from fleet.runtime.fleets import FleetRef, describe, running_fleets
from fleet.runtime.manage import ApplyRefused, apply
from tests.utils import eventually, make_spec, pool

pytestmark = pytest.mark.ray
NS = "fleet-test-manage"


WORK_AFTER = {
    "autoscaling": {"min_agents": 2, "max_agents": 4},
    "routing": {"router": "round_robin"},
    "agent_kwargs": {"delay_s": 0.01},
}


def _write(path, spec):
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def _spec(extra: bool = False, **work: object) -> object:
    base = {
        "agent_class": "fleet.agents.testing:SleepAgent",
        "agent_kwargs": {"delay_s": 0.02},
        "agents_per_host": 2,
        "cpus_per_host": 0,
        "autoscaling": {"min_agents": 2, "max_agents": 2},
    }
    pools = [pool("work", **{**base, **work})]
    if extra:
        pools.append(
            pool(
                "extra",
                agent_class="fleet.agents.testing:SleepAgent",
                agents_per_host=1,
                cpus_per_host=0,
                autoscaling={"min_agents": 1, "max_agents": 1},
            )
        )
    return make_spec(*pools, name="managed", namespace=NS, queues={"shards": 1})


def test_a_fleet_that_is_not_detached_is_not_changed_in_place(start_fleet):
    start_fleet(_spec())
    with pytest.raises(ApplyRefused, match="not detached"):
        apply(_spec(extra=True))
    assert FleetClient.connect("managed", NS).spec == _spec()


def test_apply_in_place_refuse_list_and_stop(ray_cluster, tmp_path, capsys):
    fc = FleetClient.start(_spec(), detached=True)
    try:
        _apply_list_and_stop(fc, tmp_path, capsys)
    finally:  # a failed run leaves nothing behind for the next test
        if FleetRef("managed", NS) in running_fleets():
            FleetClient.connect("managed", NS).shutdown()


def _apply_list_and_stop(fc, tmp_path, capsys):
    ref = FleetRef("managed", NS)
    assert ref in running_fleets()
    line = describe(ref)
    assert line["state"] == "running" and set(line["pools"]) == {"work"}

    ids = [f"before-{i}" for i in range(400)]
    submitted = threading.Thread(
        target=lambda: fc.submit([{"capability": "work", "id": i, "payload": {}} for i in ids])
    )
    submitted.start()
    new = _spec(extra=True, **WORK_AFTER)
    assert main(["apply", str(_write(tmp_path / "new.yaml", new)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    submitted.join()
    assert out["pools_added"] == ["extra"] and out["hosts_replaced"] == ["work"]
    assert "pools.work.autoscaling.max_agents" in out["changed"]
    assert "pools.work.routing.router" in out["changed"]
    assert "pools.work.agent_kwargs.delay_s" in out["changed"]

    after = FleetClient.connect("managed", NS)
    assert after.spec == new, "the controller runs the new spec"
    assert after.wait(ids, timeout_s=120) == []
    assert after.summary(ids)["lost"] == 0
    extra = after.submit([{"capability": "extra", "id": "x1", "payload": {"n": 1}}])
    assert after.wait(extra.accepted, timeout_s=60) == []
    assert after.results(["x1"])[0].output == {"n": 1}
    eventually(
        lambda: describe(ref)["pools"].get("extra", {}).get("agents") == 1,
        60,
        0.5,
        what="the new pool's agents reported",
    )

    with pytest.raises(ApplyRefused, match=r"queues\.shards: cannot change in place"):
        apply(make_spec(*new.pools, name="managed", namespace=NS, queues={"shards": 3}))
    bad = tmp_path / "bad.yaml"
    wider = make_spec(*new.pools, name="managed", namespace=NS, queues={"shards": 3})
    bad.write_text(yaml.safe_dump(wider.model_dump(mode="json")))
    assert main(["apply", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fleet: nothing changed: queues.shards: cannot")
    assert FleetClient.connect("managed", NS).spec == new, "a refusal changes nothing"
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["fleets"]
    mine = next(f for f in listed if (f["fleet"], f["namespace"]) == ("managed", NS))
    assert set(mine["pools"]) == {"work", "extra"}

    # Remove the new pool again: its queue is empty, so its hosts and shards go.
    assert (
        main(["apply", str(_write(tmp_path / "back.yaml", _spec(**WORK_AFTER))), "--json"])
        == 0
    )
    back = json.loads(capsys.readouterr().out)
    assert back["pools_removed"] == ["extra"]
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert "managed.queue.extra.0" not in names

    more = [f"late-{i}" for i in range(100)]
    after.submit([{"capability": "work", "id": i, "payload": {}} for i in more])
    assert main(["stop", "managed", "--namespace", NS, "--drain", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["drained"] is True and report["left_queued"] == 0
    assert ref not in running_fleets()
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NS]
    assert left == []
    from ray import serve

    assert [a for a in serve.status().applications if a.startswith("managed-")] == []
