"""Session-wide fixtures. Live tests share one local Ray cluster, started once."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, loopback only)."""
    import ray

    from fleet.runtime.client import loopback_only

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    loopback_only()
    ctx = ray.init(
        num_cpus=4,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        namespace="fleet-tests",
    )
    yield ctx
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture
def start_fleet(ray_cluster):
    """Start fleets with ``start(spec)``; each is shut down after the test, and the
    teardown checks that nothing of it is left behind."""
    import ray

    from fleet.runtime.client import FleetClient

    started = []

    def start(spec):
        fc = FleetClient.start(spec)
        started.append(fc)
        return fc

    yield start
    for fc in started:
        fc.shutdown()
        left = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == fc.spec.namespace
        ]
        assert left == [], left
