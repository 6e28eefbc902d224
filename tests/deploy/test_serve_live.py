"""`serve run serve_configs/support.yaml` and `ray job submit` against a real `ray start
--head` cluster: the HTTP ingress, with authentication on, bound to an explicit host (the
machine's own address, not loopback, where it has one) and nowhere else, tasks
submitted over HTTP and read back,
422 for invalid bodies, 429 with Retry-After when the queue is full, and a jobs/
entrypoint run to completion.

The cluster is separate from the session's (``ray job submit`` needs Ray's dashboard,
``serve run`` its own driver): its own temp dir, loopback only, token auth on, and it is
stopped by its own PIDs (tests/deploy/_cluster.py).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass

import httpx
import psutil
import pytest
import yaml

from fleet.security.keys import KeyFile
from fleet.serve_app import check_serve_config
from fleet.spec.ingress import is_loopback
from tests.deploy._cluster import BIN, REPO, LocalCluster, free_port
from tests.utils import eventually

pytestmark = pytest.mark.ray

UP_TIMEOUT_S = 150
RESULT_TIMEOUT_S = 60
JOB_TIMEOUT_S = 150
TIGHT_SPEC = """\
name: tight
namespace: fleet-tight
queues: {shards: 1, max_depth: 3, lease_s: 60}
resilience: {task_timeout_s: 300}
pools:
  - name: slow
    capability: slow
    agent_class: fleet.agents.testing:SleepAgent
    agent_kwargs: {delay_s: 120}
    agents_per_host: 1
    cpus_per_host: 0
    autoscaling: {min_agents: 1, max_agents: 1}
"""


# The ingress authenticates every call but /healthz: the fixture makes a key (tenant
# "test", every role) in the key file the specs name, and every call sends it.
AUTH: dict[str, str] = {}


def _get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, headers={**AUTH, **kw.pop("headers", {})}, **kw)


def _post(url: str, **kw) -> httpx.Response:
    return httpx.post(url, headers={**AUTH, **kw.pop("headers", {})}, **kw)


def _explicit_host() -> str:
    """An address to bind that is not Serve's default: this machine's first non-loopback
    IPv4 address, else 127.0.0.2 (still a host of its own, on Linux's 127/8)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not is_loopback(a.address):
                return a.address
    return "127.0.0.2"


def _wait_http(url: str, timeout_s: float, proc) -> httpx.Response:
    def up() -> httpx.Response | None:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}")
        r = _get(url, timeout=2)  # an HTTP error: not up yet
        return r if r.status_code == 200 else None

    return eventually(up, timeout_s, 1.0, what=f"{url} up")


@dataclass
class Served:
    cluster: LocalCluster
    url: str
    job_id: str


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A cluster serving serve_configs/support.yaml (on a free port) via `serve run`.

    To keep the module short on two cores, the slow starts overlap: the second fleet
    (for the 429 test) builds and the load job runs while the HTTP tests do; the tests
    that need them wait for them.
    """
    tmp = tmp_path_factory.mktemp("serve")
    cluster = LocalCluster(num_cpus=2).start()
    logs = []
    try:
        # The shipped file, changed in its port (8000 may be taken on a shared host) and
        # its host: with authentication on, the ingress may listen beyond loopback.
        config = yaml.safe_load((REPO / "serve_configs/support.yaml").read_text())
        port, host = free_port(), _explicit_host()
        config["http_options"]["port"] = port
        config["http_options"]["host"] = host
        # And in its storage: the durable ledger must not carry one run's outcomes into
        # the next (a resubmitted id is answered from the ledger, not run again).
        storage = {"directory": str(tmp / "storage")}
        config["applications"][0]["args"]["spec"]["queues"]["storage"] = storage
        keys = tmp / "keys.json"
        key, _ = KeyFile(keys).create("test", ["submit", "read", "admin"])
        AUTH["Authorization"] = f"Bearer {key}"
        auth = {"auth": {"keys_file": str(keys)}}
        config["applications"][0]["args"]["spec"]["ingress"] = auth
        path = tmp / "support.yaml"
        path.write_text(yaml.safe_dump(config))
        url = f"http://{host}:{port}"
        log = open(tmp / "serve-run.log", "w")
        logs.append(log)
        proc = cluster.popen([str(BIN / "serve"), "run", str(path)], stdout=log, stderr=log)
        _wait_http(f"{url}/healthz", UP_TIMEOUT_S, proc)
        # A second fleet through `serve deploy` (the REST path KubeRay's RayService
        # uses): the same config plus a tight-queue app. The running app's config is
        # unchanged, so Serve leaves it alone and only builds the new one.
        spec = tmp / "tight.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    **yaml.safe_load(TIGHT_SPEC),
                    "queues": {**yaml.safe_load(TIGHT_SPEC)["queues"], "storage": storage},
                    "ingress": auth,
                }
            )
        )
        config["applications"].append(
            {
                "name": "tight",
                "route_prefix": "/tight",
                "import_path": "fleet.serve_app:app",
                "args": {"spec": str(spec), "submit_wait_s": 0.3, "retry_after_s": 3},
            }
        )
        assert check_serve_config(config) == []
        both = tmp / "support-and-tight.yaml"
        both.write_text(yaml.safe_dump(config))
        deployed = cluster.run(
            [str(BIN / "serve"), "deploy", str(both), "--address", cluster.dashboard_url],
            timeout_s=60,
        )
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        job_id = f"fleet-load-{port}"
        sub = cluster.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                cluster.dashboard_url,
                "--submission-id",
                job_id,
                "--no-wait",
                "--working-dir",
                str(REPO),
                "--",
                "python",
                "jobs/load.py",
                "--fleet",
                "support",
                "--namespace",
                "fleet-support",
                "--tasks",
                "300",
                "--rate",
                "200",
            ],
            timeout_s=JOB_TIMEOUT_S,
        )
        assert sub.returncode == 0, sub.stderr[-3000:]
        yield Served(cluster, url, job_id)
    finally:
        cluster.stop()
        for f in logs:
            f.close()


def _result(url: str, task_id: str) -> dict:
    def outcome() -> dict | None:
        r = _get(f"{url}/tasks/{task_id}", timeout=5)
        if r.status_code != 200:
            pytest.fail(r.text)
        return r.json() if r.json()["status"] != "pending" else None

    return eventually(outcome, RESULT_TIMEOUT_S, 0.2, what=f"an outcome for {task_id}")


def test_with_auth_on_the_ingress_listens_where_told_and_nowhere_else(served):
    cluster, url = served.cluster, served.url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    port = int(port)
    r = _get(f"{url}/healthz", timeout=5)
    assert r.json() == {"status": "ok", "fleet": "support", "recorded": r.json()["recorded"]}
    addrs = set()
    for pid in cluster.pids():
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            try:
                addrs |= {
                    c.laddr.ip
                    for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port
                }
            except psutil.Error:
                continue
    assert addrs == {host}, (addrs, host)
    # Reachable there, and closed without a key.
    assert httpx.get(f"{url}/tasks/x", timeout=5).status_code == 401


def test_submit_over_http_and_read_results(served):
    url = served.url
    one = _post(
        f"{url}/tasks",
        timeout=10,
        json={"capability": "support", "payload": {"question": "Where is #7?"}},
    )
    assert one.status_code == 202, one.text
    batch = _post(
        f"{url}/tasks",
        timeout=10,
        json=[
            {
                "capability": "support",
                "id": f"http-{i}",
                "priority": i % 10,
                "payload": {"question": f"q{i}"},
            }
            for i in range(50)
        ],
    )
    assert batch.status_code == 202, batch.text
    assert batch.json()["ids"] == [f"http-{i}" for i in range(50)]
    ids = one.json()["ids"] + batch.json()["ids"]
    results = [_result(url, i) for i in ids]
    assert all(r["status"] == "completed" for r in results), results[:3]
    first = results[0]["result"]
    assert first["task_id"] == ids[0] and first["pool"] == "support"
    assert first["output"]["answer"].startswith("[sim-small]")
    assert first["latency_s"] > 0 and first["cost_usd"] > 0
    # The README's listing: every task of this key's tenant, a page at a time.
    listed, cursor = [], None
    while True:
        params = {"status": "completed", "limit": 40} | ({"cursor": cursor} if cursor else {})
        page = _get(f"{url}/tasks", params=params, timeout=10).json()
        listed += [t["id"] for t in page["tasks"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    status = _get(f"{url}/status", timeout=10).json()
    assert status["fleet"] == "support" and status["ledger"]["recorded"] >= 51
    assert status["pools"]["support"]["agents"] >= 5


def test_a_resubmitted_task_is_answered_with_its_outcome_and_a_reused_key_is_409(served):
    url = served.url
    key = f"order-{uuid.uuid4().hex[:8]}"
    task = {
        "capability": "support",
        "idempotency_key": key,
        "payload": {"question": "Can I get a refund?"},
    }
    first = _post(f"{url}/tasks", timeout=10, json=task)
    assert first.status_code == 202, first.text
    (tid,) = first.json()["ids"]
    recorded = _result(url, tid)
    again = _post(f"{url}/tasks", timeout=10, json=task)
    assert again.status_code == 200, again.text
    assert again.json() == {"ids": [tid], "results": [recorded]}
    mixed = _post(
        f"{url}/tasks",
        timeout=10,
        json=[task, {"capability": "support", "payload": {"question": "new one"}}],
    )
    assert mixed.status_code == 202, mixed.text
    assert mixed.json()["results"] == [recorded]
    other = _post(
        f"{url}/tasks", timeout=10, json={**task, "payload": {"question": "something else"}}
    )
    assert other.status_code == 409, other.text
    assert (
        f"idempotency_key '{key}' already used with a different payload"
        in other.json()["detail"]
    )
    assert other.json()["conflicts"] == [{"index": 0, "id": tid}]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"capability": "support", "priority": 42}, ["body", "task", "priority"]),
        (
            [{"capability": "support"}, {"capability": "support", "priority": -1}],
            ["body", "batch", 1, "priority"],
        ),
        ({"payload": {}}, ["body", "task", "capability"]),
        ({"capability": "support", "colour": "red"}, ["body", "task", "colour"]),
        (
            [{"capability": "support"}, {"capability": "billing"}],
            ["body", "batch", 1, "capability"],
        ),
        ({"capability": "support", "payload": "x" * 70_000}, ["body", "task", "payload"]),
        (
            {"capability": "support", "deadline_unix_s": 1.0},
            ["body", "task", "deadline_unix_s"],
        ),
        ({"capability": "support", "id": ""}, ["body", "task", "id"]),
        ([], ["body", "batch"]),
        ("just a string", ["body", "task"]),
        (None, ["body"]),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(served, body, field):
    url = served.url
    kw = {"content": b""} if body is None else {"json": body}
    r = _post(f"{url}/tasks", timeout=10, **kw)
    assert r.status_code == 422, (r.status_code, r.text)
    locs = [d["loc"] for d in r.json()["detail"]]
    assert field in locs, locs


def test_malformed_json_gets_422_not_500(served):
    url = served.url
    r = _post(
        f"{url}/tasks",
        timeout=10,
        content=b'{"capability": ',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_an_invalid_batch_queues_nothing(served):
    url = served.url
    r = _post(
        f"{url}/tasks",
        timeout=10,
        json=[
            {"capability": "support", "id": "all-or-nothing-ok"},
            {"capability": "support", "priority": 99},
        ],
    )
    assert r.status_code == 422
    # Had the valid task been queued, an idle support agent would have answered by now.
    # (A sleep, not a poll: what is checked is that nothing happens meanwhile.)
    time.sleep(1.5)
    assert _get(f"{url}/tasks/all-or-nothing-ok", timeout=5).status_code == 404


def test_openapi_schema_describes_the_api(served):
    url = served.url
    doc = _get(f"{url}/openapi.json", timeout=10).json()
    assert set(doc["paths"]) >= {"/tasks", "/tasks/{task_id}", "/status", "/healthz"}
    body = doc["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"]
    assert {"$ref": "#/components/schemas/Task"} in body["schema"]["oneOf"]
    assert {"202", "422", "429"} <= set(doc["paths"]["/tasks"]["post"]["responses"])
    assert "capability" in doc["components"]["schemas"]["Task"]["required"]


def test_queue_full_gets_429_with_retry_after(served):
    # The second fleet, added by `serve deploy` in the fixture.
    tight = f"{served.url}/tight"
    _wait_http(f"{tight}/healthz", UP_TIMEOUT_S, None)
    # The only agent takes one task for two minutes; the queue holds 3 pending at most.
    first = _post(f"{tight}/tasks", timeout=10, json={"capability": "slow", "id": "hold"})
    assert first.status_code == 202
    over = _post(
        f"{tight}/tasks",
        timeout=10,
        json=[{"capability": "slow", "id": f"x{i}"} for i in range(3)],
    )
    assert over.status_code == 429, over.text
    assert over.headers["retry-after"] == "3"
    body = over.json()
    assert body["accepted"] == [] and [n["id"] for n in body["not_queued"]] == [
        "x0",
        "x1",
        "x2",
    ]
    assert body["detail"].startswith("queue full")
    fits = _post(
        f"{tight}/tasks",
        timeout=10,
        json=[{"capability": "slow", "id": f"y{i}"} for i in range(2)],
    )
    assert fits.status_code == 202, fits.text
    again = _post(f"{tight}/tasks", timeout=10, json={"capability": "slow", "id": "z"})
    assert again.status_code == 429 and again.headers["retry-after"] == "3"
    # Accepted work is queued, and the refused ids never were.
    st = _get(f"{tight}/status", timeout=10).json()["pools"]["slow"]["queue"]
    assert st["depth"] + st["leased"] == 3


def test_ray_job_submit_runs_the_load_entrypoint_to_completion(served):
    # Submitted by the fixture (`ray job submit --working-dir . -- python jobs/load.py`);
    # `ray job logs --follow` returns when the job ends.
    cluster = served.cluster
    logs = cluster.run(
        [
            str(BIN / "ray"),
            "job",
            "logs",
            "--address",
            cluster.dashboard_url,
            "--follow",
            served.job_id,
        ],
        timeout_s=JOB_TIMEOUT_S,
    )
    status = cluster.run(
        [str(BIN / "ray"), "job", "status", "--address", cluster.dashboard_url, served.job_id],
        timeout_s=60,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower(), (
        status.stdout,
        logs.stdout[-3000:],
    )
    summary = next(
        json.loads(line) for line in reversed(logs.stdout.splitlines()) if line.startswith("{")
    )
    assert summary["started_fleet"] is False and summary["fleet"] == "support"
    assert summary["submitted"] == 300 and summary["lost"] == 0
    assert summary["completed"] + summary["failed"] == 300
    assert summary["latency_s"]["p95"] > 0
