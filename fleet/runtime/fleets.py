"""The fleets on a Ray cluster: found by their controllers' names (``<fleet>.controller``),
in every namespace, with their state and counts (``fleet list``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from fleet.runtime.names import Names

CONTROLLER_SUFFIX = ".controller"
STATUS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FleetRef:
    name: str
    namespace: str


def running_fleets() -> list[FleetRef]:
    """Every fleet whose controller is registered on the connected cluster, sorted."""
    from ray.util import list_named_actors

    found = set()
    for entry in list_named_actors(all_namespaces=True):
        name, ns = entry["name"], entry["namespace"]
        if name.endswith(CONTROLLER_SUFFIX) and name.count(".") == 1:
            found.add(FleetRef(name.removesuffix(CONTROLLER_SUFFIX), ns))
    return sorted(found, key=lambda f: (f.namespace, f.name))


def describe(ref: FleetRef) -> dict[str, Any]:
    """One fleet's line for ``fleet list``: pools with agents, hosts and queue depth,
    recorded outcomes; ``state`` is ``running``, or ``unreachable`` with the reason."""
    try:
        ctl = ray.get_actor(Names(ref.name).controller, namespace=ref.namespace)
        st = ray.get(ctl.status.remote(), timeout=STATUS_TIMEOUT_S)
    except Exception as exc:  # a controller restarting, or gone between list and ask
        return {
            "fleet": ref.name,
            "namespace": ref.namespace,
            "state": "unreachable",
            "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
        }
    return {
        "fleet": ref.name,
        "namespace": ref.namespace,
        "state": "running",
        "pools": pool_lines(st["pools"]),
    }


def pool_lines(pools: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pool of a controller's status: agents, hosts, queue depth and in flight
    (``fleet list``, ``fleet run``'s status lines); entries such as ``_error`` left out."""
    return {
        name: {k: p.get(k) for k in ("agents", "hosts", "queue_depth", "in_flight")}
        for name, p in pools.items()
        if not name.startswith("_")
    }
