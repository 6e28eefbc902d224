"""Ingress benchmark: what authentication costs ``POST /tasks``.

Two fleets alike (no-op agents, the durable defaults) but for authentication, each
behind its HTTP ingress on Serve's proxy on 127.0.0.1, called by ``CLIENTS`` threads
that each post batches of ``BATCH`` tasks as fast as the ingress answers, for
``ROUND_S`` seconds a round. Rounds alternate between the two: one with authentication
on (every request carries a key, so it is hashed, looked up, charged to the tenant's
token bucket and its body bounded), one with ``ingress.auth.mode: none``. The figure
is tasks accepted per second, per mode, with the median over rounds; the tenant's rate
limit is set high enough never to refuse. The agents run the accepted tasks meanwhile,
as in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpx

from fleet.security.keys import KeyFile

NEEDS_RAY = True
BATCH = 100
CLIENTS = 4
ROUND_S = 10.0
ROUNDS = 3
QUICK_ROUND_S = 3.0
QUICK_ROUNDS = 1


def _spec(directory: str, name: str, auth: dict[str, Any]) -> Any:
    from fleet.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "namespace": f"fleet-{name}",
            "queues": {
                "shards": 2,
                "max_depth": 2_000_000,
                "storage": {"directory": os.path.join(directory, name)},
            },
            "ingress": {
                "auth": auth,
                "limits": {"tenant_requests_per_s": 1e6, "tenant_burst": 1_000_000},
            },
            "pools": [
                {
                    "name": "noop",
                    "capability": "noop",
                    "agent_class": "fleet.agents.examples:NoopAgent",
                    "agents_per_host": 100,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": 100, "max_agents": 100},
                }
            ],
        }
    )


def stop_ingress_fleets(fleets: Iterable[Any], directory: str) -> None:
    """Remove each fleet's ingress app (``<fleet>-ingress``), stop the fleet, and delete
    the benchmark's storage directory."""
    from ray import serve

    for fc in fleets:
        try:
            serve.delete(f"{fc.spec.name}-ingress")
        except Exception:  # never deployed, or gone already: the fleet still stops
            pass
        fc.shutdown()
    shutil.rmtree(directory, ignore_errors=True)


def _round(url: str, headers: dict[str, str], seconds: float) -> tuple[int, int]:
    """(tasks accepted, requests refused) by CLIENTS threads over ``seconds``."""
    accepted = [0] * CLIENTS
    refused = [0] * CLIENTS
    stop = time.monotonic() + seconds
    body = [{"capability": "noop", "payload": {"i": i}} for i in range(BATCH)]

    def client(k: int) -> None:
        with httpx.Client(headers=headers, timeout=30) as c:
            while time.monotonic() < stop:
                r = c.post(f"{url}/tasks", json=body)
                if r.status_code == 202:
                    accepted[k] += BATCH
                else:
                    refused[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(accepted), sum(refused)


def run(quick: bool = False) -> dict[str, Any]:
    from ray import serve

    from fleet.ingress import Ingress
    from fleet.runtime.client import FleetClient
    from fleet.runtime.deploy import start_serve

    round_s, rounds = (QUICK_ROUND_S, QUICK_ROUNDS) if quick else (ROUND_S, ROUNDS)
    loadavg = os.getloadavg()
    directory = tempfile.mkdtemp(prefix="fleet-bench-ingress-")
    keys = KeyFile(os.path.join(directory, "keys.json"))
    key, _ = keys.create("bench", ["submit"])
    keyed = _spec(directory, "bench-keys", {"keys_file": str(keys.path)})
    open_ = _spec(directory, "bench-open", {"mode": "none"})
    with socket.socket() as sock:  # a free loopback port for Serve's proxy
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start_serve(http_port=port, http=True)  # before the fleets: they reuse this Serve
    fleets = [FleetClient.start(keyed), FleetClient.start(open_)]
    base = f"http://127.0.0.1:{port}"
    out: dict[str, list[float]] = {"keys": [], "none": []}
    refused = 0
    try:
        for spec, prefix in ((keyed, "/k"), (open_, "/o")):
            serve.run(
                Ingress.bind(spec.name, spec.namespace),
                name=f"{spec.name}-ingress",
                route_prefix=prefix,
            )
        _round(f"{base}/k", {"Authorization": f"Bearer {key}"}, 1.0)  # warm both
        _round(f"{base}/o", {}, 1.0)
        for _ in range(rounds):
            for mode, path, headers in (
                ("keys", "/k", {"Authorization": f"Bearer {key}"}),
                ("none", "/o", {}),
            ):
                t0 = time.monotonic()
                n, bad = _round(f"{base}{path}", headers, round_s)
                out[mode].append(n / (time.monotonic() - t0))
                refused += bad
    finally:
        stop_ingress_fleets(fleets, directory)
    keys_med, none_med = statistics.median(out["keys"]), statistics.median(out["none"])
    return {
        "batch": BATCH,
        "clients": CLIENTS,
        "round_s": round_s,
        "tasks_per_s": {m: [round(x) for x in v] for m, v in out.items()},
        "median_tasks_per_s": {"keys": round(keys_med), "none": round(none_med)},
        "auth_cost_pct": round(100 * (1 - keys_med / none_med), 1) if none_med else None,
        "refused_requests": refused,
        "loadavg_at_start": [round(x, 2) for x in loadavg],
    }
