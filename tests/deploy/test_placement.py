"""Where a fleet's processes go: hosts reserve their resources in a placement group each,
or, with ``max_hosts_per_node``, as their own resources under Serve's
``max_replicas_per_node`` (Serve accepts the options either way); the actors that hold
files ask for the storage node's resource."""

from __future__ import annotations

import pytest
from ray import serve

from fleet.runtime.deploy import host_deployment_options, storage_options
from fleet.runtime.host import AgentHost
from fleet.spec import SpecError
from fleet.spec.queues import HEAD_NODE_RESOURCE
from tests.utils import make_spec, pool


def _options(**over):
    spec = make_spec(pool("work", cpus_per_host=1, **over))
    opts = host_deployment_options(spec, spec.pools[0])
    serve.deployment(AgentHost).options(**opts)  # Serve validates them here
    return opts


def test_by_default_each_host_reserves_a_placement_group_bundle():
    opts = _options()
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}]
    assert "max_replicas_per_node" not in opts


def test_max_hosts_per_node_bounds_the_hosts_on_a_node():
    opts = _options(max_hosts_per_node=2)
    assert opts["max_replicas_per_node"] == 2
    assert "placement_group_bundles" not in opts
    assert opts["ray_actor_options"]["num_cpus"] == 1  # still reserved, by the host


def test_max_hosts_per_node_must_be_positive():
    with pytest.raises(SpecError, match=r"pools\.0\.max_hosts_per_node"):
        make_spec(pool("work", max_hosts_per_node=0))


def test_file_holding_actors_ask_for_the_storage_nodes_resource():
    durable = make_spec(pool("work"), queues={"storage": {"directory": "x"}})
    opts = storage_options(durable, detached=False)
    assert opts("a.ledger")["resources"] == {HEAD_NODE_RESOURCE: pytest.approx(0.001)}
    assert "resources" not in opts("a.dispatcher", pinned=False)
    custom = make_spec(
        pool("work"), queues={"storage": {"directory": "x", "node": "resource:disk_a"}}
    )
    assert storage_options(custom, detached=True)("a.ledger")["resources"] == {
        "disk_a": pytest.approx(0.001)
    }
    memory = make_spec(pool("work"))  # nothing on disk: runs anywhere
    assert "resources" not in storage_options(memory, detached=False)("a.ledger")
    with pytest.raises(SpecError, match=r"queues\.storage\.node"):
        make_spec(pool("work"), queues={"storage": {"node": "worker-1"}})
