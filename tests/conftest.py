"""Fixtures for every test directory. Live tests that take ``ray_cluster`` (directly or
through ``start_fleet``) share one local Ray cluster, started once per session; tests
that need a cluster of their own (whole-cluster restarts, deployments) start it in a
subprocess."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: 4 logical CPUs (Ray's scheduling
    slots, whatever the machine's cores), bound to 127.0.0.1 (``loopback_only``), no
    dashboard, namespace ``fleet-tests``."""
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
    teardown checks that no named actor is left in its namespace."""
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
