"""Fixtures for every test directory. Live tests that take ``ray_cluster`` (directly or
through ``start_fleet``) share one local Ray cluster, started once per session; tests
that need a cluster of their own (whole-cluster restarts, deployments) start it in a
subprocess."""

from __future__ import annotations

import os

import pytest

# How often Ray workers export metrics to the node agent in the test cluster (ms).
METRICS_REPORT_MS = 1000


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: 4 logical CPUs (Ray's scheduling
    slots, whatever the machine's cores), bound to 127.0.0.1 (``loopback_only``),
    namespace ``fleet-tests``; Ray's dashboard on a free loopback port (it writes the
    Prometheus service-discovery file the observability tests scrape through); Serve
    with its HTTP proxy on a free loopback port (the ``http_url`` fixture), so ingress
    tests can call it over HTTP."""
    import socket

    import ray

    from fleet.runtime.client import loopback_only
    from fleet.runtime.deploy import start_serve

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    loopback_only()
    ctx = ray.init(
        address="local",  # a cluster of its own, whatever `ray start` left registered
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),  # not 8265: tests start clusters of their own too
        configure_logging=False,
        log_to_driver=False,
        namespace="fleet-tests",
        # Metrics reach Ray's agent each second (Ray's default: 10 s), so tests that
        # read them back wait seconds, not tens of seconds.
        _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS},
    )
    port = free_port()
    start_serve(http_port=port, http=True)
    os.environ["FLEET_TEST_HTTP_URL"] = f"http://127.0.0.1:{port}"
    yield ctx
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture
def http_url(ray_cluster) -> str:
    """The session cluster's Serve HTTP proxy (loopback)."""
    return os.environ["FLEET_TEST_HTTP_URL"]


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
