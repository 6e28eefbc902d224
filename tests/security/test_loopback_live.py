"""With authentication off, the HTTP ingress answers anyone who can reach it, so nothing
of a local fleet may listen beyond loopback: every listening socket of the session's Ray
processes (GCS, raylet, workers, Serve's proxy, the fleet's actors and hosts) is checked
while a fleet with ``ingress.auth.mode: none`` serves HTTP.

One exception, Ray's and not fleet's: each Serve replica (the ingress and every host)
runs an inter-deployment gRPC server that Ray Serve 2.60 binds to ``[::]:0``
unconditionally (``ray/serve/_private/replica.py``, ``add_port_to_grpc_server(self._server,
"[::]:0")``); Ray attaches its token-authentication interceptor to it, so it refuses
calls without the cluster's token. The test allows exactly one such socket per replica
process and nothing else.
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import psutil
import pytest

from fleet.spec.ingress import is_loopback
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray
REPLICA = "ray::ServeReplica:"  # a Serve replica's process title


def _listening(pids: list[int]) -> set[tuple[str, int, str, int]]:
    """(ip, port, process title, pid) of every listening inet socket of ``pids`` and
    their descendants."""
    out: set[tuple[str, int, str, int]] = set()
    seen: set[int] = set()
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                conns = proc.net_connections(kind="inet")
                what = " ".join(proc.cmdline())[:120]
            except psutil.Error:
                continue
            out |= {
                (c.laddr.ip, c.laddr.port, what, proc.pid)
                for c in conns
                if c.status == psutil.CONN_LISTEN
            }
    return out


def test_with_auth_off_every_listening_socket_is_on_loopback(start_fleet, http_url):
    import ray
    from ray import serve

    from fleet.ingress import Ingress

    spec = make_spec(
        pool(
            "open",
            agent_class="fleet.agents.testing:SleepAgent",
            agents_per_host=1,
            cpus_per_host=0,
            autoscaling={"min_agents": 1, "max_agents": 1},
        ),
        name="open",
        namespace="fleet-test-open",
        queues={"shards": 1},
        ingress={"auth": {"mode": "none"}},
    )
    start_fleet(spec)
    app = "open-ingress"
    serve.run(Ingress.bind(spec.name, spec.namespace), name=app, route_prefix="/open")
    try:
        url = f"{http_url}/open"
        r = httpx.post(f"{url}/tasks", json={"capability": "open", "payload": {}}, timeout=30)
        assert r.status_code == 202, r.text  # no key needed: auth is off
        (task_id,) = r.json()["ids"]
        got = httpx.get(f"{url}/tasks/{task_id}?wait_s=20", timeout=40).json()
        assert got["status"] == "completed"
        node = ray._private.worker._global_node
        roots = [p.process.pid for procs in node.all_processes.values() for p in procs]
        assert roots, "the session's Ray processes must be found"
        sockets = _listening([*roots, os.getpid()])
        port = int(http_url.rsplit(":", 1)[1])
        assert any(s[1] == port for s in sockets), "Serve's proxy must be among them"
        assert len(sockets) >= 5, sockets  # GCS, raylet, object manager, workers, proxy
        exposed = sorted(s for s in sockets if not is_loopback(s[0]))
        replica_grpc = [s for s in exposed if s[0] == "::" and s[2].startswith(REPLICA)]
        assert [s for s in exposed if s not in replica_grpc] == [], exposed
        per_replica = Counter(s[3] for s in replica_grpc)
        assert all(n == 1 for n in per_replica.values()), per_replica
    finally:
        serve.delete(app)
