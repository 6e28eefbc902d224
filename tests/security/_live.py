"""A fleet behind its HTTP ingress on the session cluster's Serve proxy, for the live
security tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def ingress_fleet(
    spec: Any, route_prefix: str, replicas: int = 1
) -> Iterator[tuple[Any, str]]:
    """Start ``spec`` and its ingress (``replicas`` of it) under ``route_prefix``; yield
    the client and the ingress's URL; then remove both and check that no named actor of
    the fleet is left."""
    import ray
    from ray import serve

    from fleet.ingress import Ingress
    from fleet.runtime.client import FleetClient

    fc = FleetClient.start(spec)
    app = f"{spec.name}-ingress"
    try:
        ingress = Ingress.options(num_replicas=replicas, autoscaling_config=None)
        serve.run(ingress.bind(spec.name, spec.namespace), name=app, route_prefix=route_prefix)
        yield fc, os.environ["FLEET_TEST_HTTP_URL"] + route_prefix
    finally:
        serve.delete(app)
        fc.shutdown()
    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == spec.namespace
    ]
    assert left == [], left
