"""Placement groups: a pool's hosts reserve CPU before they start; an impossible pool
fails at deploy with the arithmetic instead of hanging."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util import placement_group_table

from fleet.runtime.client import FleetClient
from fleet.runtime.deploy import PoolUnschedulable
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray


def _created_bundles() -> list[dict]:
    return [
        b
        for pg in placement_group_table().values()
        if pg["state"] == "CREATED"
        for b in pg["bundles"].values()
    ]


def test_pool_hosts_reserve_their_cpu_in_placement_groups(ray_cluster):
    before = _created_bundles().count({"CPU": 1.0})
    spec = make_spec(
        pool(
            "pg",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=1,
            agents_per_host=5,
            autoscaling={"min_agents": 10, "max_agents": 10},
        ),
        name="pg1",
        namespace="fleet-pg1",
    )
    fc = FleetClient.start(spec)
    try:
        assert _created_bundles().count({"CPU": 1.0}) - before == 2, "one bundle per host"
        ids = fc.submit([{"capability": "pg"} for _ in range(20)]).accepted
        assert fc.wait(ids, timeout_s=60) == []
    finally:
        fc.shutdown()


def test_pool_larger_than_the_cluster_fails_fast_with_the_arithmetic(ray_cluster):
    spec = make_spec(
        pool(
            "huge",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=64,
            placement_timeout_s=2,
            autoscaling={"min_agents": 1, "max_agents": 1},
        ),
        name="pg2",
        namespace="fleet-pg2",
    )
    t0 = time.monotonic()
    with pytest.raises(PoolUnschedulable) as exc:
        FleetClient.start(spec)
    assert time.monotonic() - t0 < 30, "must not hang"
    msg = str(exc.value)
    assert (
        "pool 'huge' is unschedulable" in msg and "'CPU': 64" in msg and "cluster has" in msg
    )
    assert not [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "fleet-pg2"
    ], "nothing left behind"
    assert not [
        pg
        for pg in placement_group_table().values()
        if pg["name"].startswith("pg2.") and pg["state"] != "REMOVED"
    ]
