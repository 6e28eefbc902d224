"""The application builder's fleet bring-up on the session cluster: deploy once, reuse
a running fleet of the same spec, bring back a deleted pool app, and refuse a running
fleet with another spec or with actors missing."""

from __future__ import annotations

import pytest
import ray
from ray import serve

from fleet.runtime.names import Names
from fleet.serve_app import FleetMismatch, ensure_fleet, teardown
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray


def _spec(delay_s: float = 0.01):
    return make_spec(
        pool(
            "echo",
            agent_class="fleet.agents.testing:SleepAgent",
            agent_kwargs={"delay_s": delay_s},
            cpus_per_host=0,
        ),
        name="builder",
        namespace="fleet-test-builder",
        queues={"shards": 1},
    )


def test_ensure_fleet_deploys_reuses_restores_and_refuses(ray_cluster):
    spec = _spec()
    names = Names(spec.name)
    try:
        assert ensure_fleet(spec) == "deployed"
        ledger = ray.get_actor(names.ledger, namespace=spec.namespace)
        assert ensure_fleet(spec) == "running"
        assert (
            ray.get_actor(names.ledger, namespace=spec.namespace)._actor_id == ledger._actor_id
        ), "a running fleet is reused, not redeployed"
        serve.delete(names.pool_app("echo"))
        assert ensure_fleet(spec) == "restored"
        assert names.pool_app("echo") in serve.status().applications
        with pytest.raises(FleetMismatch, match="already runs with a different spec"):
            ensure_fleet(_spec(delay_s=0.5))
        ray.kill(ray.get_actor(names.dispatcher, namespace=spec.namespace))
        with pytest.raises(FleetMismatch, match=r"runs only partly .*builder\.dispatcher"):
            ensure_fleet(spec)
    finally:
        teardown(spec)
    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == spec.namespace
    ]
    assert left == []
    assert names.pool_app("echo") not in serve.status().applications
