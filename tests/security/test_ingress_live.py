"""The HTTP ingress with authentication on, over HTTP, on the session cluster: one fleet
and two ingress replicas for the module. Keys and roles (401, 403), tenants (ids scoped
per tenant, each reads and cancels only its own tasks), limits (413, 429 across both
replicas), 404 for unknown ids, cancel, long-poll, revocation reaching every replica,
and no secret in /status or in a result."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fleet.security.keys import KeyFile
from tests.security._live import ingress_fleet
from tests.utils import eventually, make_spec, pool

pytestmark = pytest.mark.ray

SECRET = "sk-live-abcdef123456"
RATE, BURST = 2.0, 15  # low: 45 quick posts must outrun it even on a slow machine
RELOAD_S = 0.5


@pytest.fixture(scope="module")
def sec(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    keys = KeyFile(tmp / "keys.json")
    made = {
        "acme": keys.create("acme", ["submit", "read"])[0],
        "globex": keys.create("globex", ["submit", "read"])[0],
        "reader": keys.create("acme", ["read"])[0],
        "writer": keys.create("writer", ["submit"])[0],
        "admin": keys.create("ops", ["admin", "read"])[0],
        "flood": keys.create("flood", ["submit"])[0],
        "canceller": keys.create("canc", ["submit", "read"])[0],
        "lister": keys.create("lister", ["submit", "read"])[0],
        "walled": keys.create("walled", ["submit", "read"])[0],
    }
    spec = make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:SleepAgent",
            agent_kwargs={"delay_s": 0.01, "api_key": SECRET},
            agents_per_host=2,
            cpus_per_host=0,
            autoscaling={"min_agents": 2, "max_agents": 2},
        ),
        pool(
            "slow",
            agent_class="fleet.agents.testing:SleepAgent",
            agent_kwargs={"delay_s": 0.01},
            agents_per_host=1,
            cpus_per_host=0,
            autoscaling={"min_agents": 1, "max_agents": 1},
        ),
        name="sec",
        namespace="fleet-test-sec",
        queues={"shards": 2},
        resilience={"task_timeout_s": 60},
        bulkheads={"tenants": {"walled": {"max_queued": 2}}},  # one per shard
        ingress={
            "auth": {"keys_file": str(tmp / "keys.json"), "reload_s": RELOAD_S},
            "limits": {
                "max_body_bytes": 64 * 1024,
                "max_batch_tasks": 50,
                "tenant_requests_per_s": RATE,
                "tenant_burst": BURST,
                "max_wait_s": 20,
            },
        },
    )
    with ingress_fleet(spec, "/sec", replicas=2) as (fc, url):
        yield SimpleNamespace(fc=fc, url=url, keys=made, file=keys)


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _post(sec, key: str | None, body: Any, **kw: Any) -> httpx.Response:
    headers = _h(key) if key else {}
    return httpx.post(f"{sec.url}/tasks", json=body, headers=headers, timeout=30, **kw)


def _get(sec, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{sec.url}{path}", headers=_h(key), timeout=40)


def test_keys_and_roles(sec):
    task = {"capability": "work", "payload": {}}
    assert _post(sec, None, task).status_code == 401
    wrong = _post(sec, "fleet_" + "x" * 43, task)
    assert wrong.status_code == 401 and wrong.json() == _post(sec, None, task).json()
    assert _post(sec, sec.keys["reader"], task).status_code == 403  # no submit role
    assert _get(sec, sec.keys["writer"], "/tasks/x").status_code == 403  # no read role
    assert _get(sec, sec.keys["acme"], "/metrics").status_code == 403  # not admin
    assert _get(sec, sec.keys["admin"], "/metrics").status_code == 200
    assert httpx.get(f"{sec.url}/healthz", timeout=10).status_code == 200  # public


def test_tenants_have_their_own_ids_results_and_cancels(sec):
    a, b = sec.keys["acme"], sec.keys["globex"]
    # globex takes the id first: acme's task of the same id is still its own.
    rb = _post(sec, b, {"capability": "work", "id": "same", "payload": {"who": "globex"}})
    ra = _post(sec, a, {"capability": "work", "id": "same", "payload": {"who": "acme"}})
    assert rb.status_code == 202 and ra.status_code == 202, (rb.text, ra.text)
    assert ra.json()["ids"] == ["same"] == rb.json()["ids"]
    got_a = _get(sec, a, "/tasks/same?wait_s=20").json()
    got_b = _get(sec, b, "/tasks/same?wait_s=20").json()
    assert got_a["status"] == "completed" and got_a["result"]["output"] == {"who": "acme"}
    assert got_b["result"]["output"] == {"who": "globex"}
    assert got_a["result"]["task_id"] == "same"  # the tenant's id, not the fleet's
    # globex cannot cancel or read acme's other task; a third tenant sees none.
    _post(sec, a, {"capability": "work", "id": "acme-only", "payload": {}})
    assert _get(sec, b, "/tasks/acme-only").status_code == 404
    gone = httpx.delete(f"{sec.url}/tasks/acme-only", headers=_h(b), timeout=10)
    assert gone.status_code == 404
    assert _get(sec, a, "/tasks/acme-only?wait_s=20").json()["status"] == "completed"
    # Inside the fleet the two tasks are two ids, one per tenant.
    assert {o.task_id for o in sec.fc.results(["@acme:same", "@globex:same"])} == {
        "@acme:same",
        "@globex:same",
    }


def test_an_unknown_id_is_404(sec):
    r = _get(sec, sec.keys["acme"], "/tasks/never-submitted")
    assert r.status_code == 404 and r.json() == {"detail": "no such task"}


def test_cancel_a_pending_task_and_refuse_a_running_one(sec):
    k = sec.keys["canceller"]
    blocker = {"capability": "slow", "id": "blocker", "payload": {"sleep_s": 6}}
    assert _post(sec, k, blocker).status_code == 202
    # The slow pool has one slot: once the blocker is leased, the victim waits queued.
    eventually(
        lambda: sec.fc.status()["pools"]["slow"]["queue"]["leased"] >= 1,
        30,
        0.2,
        what="the blocker leased",
    )
    assert (
        _post(sec, k, {"capability": "slow", "id": "victim", "payload": {}}).status_code == 202
    )
    running = httpx.delete(f"{sec.url}/tasks/blocker", headers=_h(k), timeout=10)
    assert running.status_code == 409 and "running" in running.json()["detail"]
    r = httpx.delete(f"{sec.url}/tasks/victim", headers=_h(k), timeout=10)
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    assert res["status"] == "failed" and res["reason"] == "cancelled"
    assert res["started_unix_s"] is None and res["agent_id"] is None
    # The blocker finishes; the victim never ran: its outcome is still the cancel.
    assert _get(sec, k, "/tasks/blocker?wait_s=20").json()["status"] == "completed"
    again = _get(sec, k, "/tasks/victim").json()
    assert again["result"]["reason"] == "cancelled" and again["result"]["agent_id"] is None
    late = httpx.delete(f"{sec.url}/tasks/victim", headers=_h(k), timeout=10)
    assert late.status_code == 409 and "already finished" in late.json()["detail"]


def _polite_get(sec, key: str, path: str) -> httpx.Response:
    """A GET that, like a good client, waits out a 429's Retry-After (this module's
    tenants have a low rate) and tries again, a few times."""
    for _ in range(5):
        r = _get(sec, key, path)
        if r.status_code != 429:
            return r
        time.sleep(int(r.headers["retry-after"]))
    return r


def _listing(sec, key: str, query: str) -> list[list[dict[str, Any]]]:
    """Every page of ``GET /tasks?<query>``, following the cursor to the end."""
    pages, cursor = [], None
    while True:
        url = f"/tasks?{query}" + (f"&cursor={cursor}" if cursor else "")
        r = _polite_get(sec, key, url)
        assert r.status_code == 200, r.text
        pages.append(r.json()["tasks"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 10


def test_a_tenant_lists_its_own_tasks_page_by_page(sec):
    k = sec.keys["lister"]
    done = [
        {"capability": "work", "id": f"d{i}", "payload": {"fail": "no"} if i == 2 else {}}
        for i in range(5)
    ]
    blocker = {"capability": "slow", "id": "p-blocker", "payload": {"sleep_s": 8}}
    assert _post(sec, k, [*done, blocker]).status_code == 202
    assert _get(sec, k, "/tasks/d4?wait_s=20").json()["status"] == "completed"
    assert _get(sec, k, "/tasks/d2?wait_s=20").json()["status"] == "failed"
    waiting = [{"capability": "slow", "id": f"p{i}", "payload": {}} for i in range(2)]
    assert _post(sec, k, waiting).status_code == 202
    # Another tenant's finished task of the same id is not listed.
    g = sec.keys["globex"]
    _post(sec, g, {"capability": "work", "id": "d0", "payload": {}})
    assert _polite_get(sec, g, "/tasks/d0?wait_s=20").json()["status"] == "completed"

    pending = [t for page in _listing(sec, k, "status=pending&limit=2") for t in page]
    assert [t["id"] for t in pending] == ["p-blocker", "p0", "p1"]
    assert {t["status"] for t in pending} == {"pending"}
    failed = _listing(sec, k, "status=failed")
    assert [[t["id"] for t in page] for page in failed] == [["d2"]]
    assert failed[0][0]["result"]["reason"] == "error"
    pages = _listing(sec, k, "status=completed&limit=3")
    assert [len(p) for p in pages] == [3, 1] or [len(p) for p in pages] == [3, 1, 0]
    assert sorted(t["id"] for p in pages for t in p) == ["d0", "d1", "d3", "d4"]
    assert all(t["result"]["status"] == "completed" for p in pages for t in p)
    every = [t["id"] for p in _listing(sec, k, "limit=8") for t in p]
    assert every[:3] == ["p-blocker", "p0", "p1"]
    assert sorted(every[3:]) == ["d0", "d1", "d2", "d3", "d4"]
    # A cursor is good only for the listing it came from; garbage is a 422, not a 500.
    first = _polite_get(sec, k, "/tasks?status=completed&limit=1").json()["next_cursor"]
    other = _polite_get(sec, k, f"/tasks?status=failed&cursor={first}")
    assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["query", "cursor"]
    assert _polite_get(sec, k, "/tasks?cursor=not-a-cursor").status_code == 422
    assert _polite_get(sec, k, "/tasks?status=done").status_code == 422
    assert _get(sec, sec.keys["writer"], "/tasks").status_code == 403  # no read role


def test_oversized_bodies_and_batches_are_refused_and_nothing_is_queued(sec):
    k = sec.keys["acme"]
    big = {"capability": "work", "id": "big", "payload": {"x": "y" * 70_000}}
    r = _post(sec, k, big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    batch = [{"capability": "work", "id": f"b{i}", "payload": {}} for i in range(51)]
    r = _post(sec, k, batch)
    assert r.status_code == 413 and "max_batch_tasks" in r.json()["detail"]
    assert _get(sec, k, "/tasks/big").status_code == 404
    assert _get(sec, k, "/tasks/b0").status_code == 404


def test_a_tenant_over_its_rate_gets_429_across_both_replicas(sec):
    k = sec.keys["flood"]
    n = 3 * BURST
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool_:
        codes = list(
            pool_.map(lambda i: _post(sec, k, {"capability": "work", "payload": {}}), range(n))
        )
    elapsed = time.monotonic() - t0
    accepted = sum(r.status_code == 202 for r in codes)
    limited = [r for r in codes if r.status_code == 429]
    assert accepted + len(limited) == n, {r.status_code for r in codes}
    assert limited and int(limited[0].headers["retry-after"]) >= 1
    # Replicas only spend tokens the one shared bucket granted: never more than the
    # burst plus the rate over the time taken (each replica alone would allow a burst).
    assert accepted <= BURST + RATE * elapsed + 1, (accepted, elapsed)


def test_a_revoked_key_is_refused_by_every_replica(sec):
    key, rec = sec.file.create("temp", ["read"])
    eventually(
        lambda: _get(sec, key, "/tasks/x").status_code == 404, 10, 0.2, what="key accepted"
    )
    sec.file.revoke(rec.id)

    def refused_everywhere() -> bool:
        # Many requests at once, so both replicas answer some of them.
        with ThreadPoolExecutor(8) as pool_:
            codes = list(
                pool_.map(lambda _: _get(sec, key, "/tasks/x").status_code, range(16))
            )
        assert set(codes) <= {401, 404}, codes
        return codes == [401] * 16

    # Within seconds (each replica re-reads the file within reload_s), no redeploy.
    eventually(refused_everywhere, 10, 0.1, what="the revoked key refused by every replica")


def test_no_secret_in_status_or_results(sec):
    k = sec.keys["acme"]
    r = _post(sec, k, {"capability": "work", "id": "leak", "payload": {"fail": SECRET}})
    assert r.status_code == 202
    res = _get(sec, k, "/tasks/leak?wait_s=20").json()["result"]
    assert res["status"] == "failed" and "[redacted]" in res["error"]
    assert SECRET not in str(res)
    status = _get(sec, sec.keys["admin"], "/status")
    assert status.status_code == 200 and "pools" in status.json()
    for text in (status.text, str(sec.fc.status())):
        assert SECRET not in text
        assert not any(key in text for key in sec.keys.values())
    # A tenant without admin sees its own pending tasks only.
    own = _get(sec, k, "/status").json()
    assert own["tenant"] == "acme" and set(own["pending"]) == {"work", "slow"}


def test_an_unknown_query_parameter_is_a_422_naming_it(sec):
    r = _polite_get(sec, sec.keys["acme"], "/tasks/x?wait=5")  # wait_s misspelt
    assert r.status_code == 422
    assert r.json()["detail"] == [
        {"type": "extra_forbidden", "loc": ["query", "wait"], "msg": "unknown parameter"}
    ]
    assert _polite_get(sec, sec.keys["acme"], "/tasks?state=failed").status_code == 422


def test_a_tenant_past_its_bulkhead_gets_429_naming_the_ids_not_queued(sec):
    ids = [f"w{k}" for k in range(10)]

    def post(key: str) -> httpx.Response:
        body = [{"capability": "work", "id": i} for i in ids]
        return httpx.post(f"{sec.url}/tasks", json=body, headers=_h(key), timeout=30)

    r = post(sec.keys["walled"])
    assert r.status_code == 429, r.text
    body = r.json()
    # Each of the two shards takes one of the tenant's tasks and refuses the rest.
    assert len(body["accepted"]) == 2
    assert {n["reason"] for n in body["not_queued"]} == {"bulkhead"}
    assert sorted(body["accepted"] + [n["id"] for n in body["not_queued"]]) == sorted(ids)
    assert r.headers["Retry-After"] == "1" and body["retry_after_s"] == 1
    # Another tenant is not walled in: the same batch is accepted whole.
    other = post(sec.keys["lister"])
    assert other.status_code == 202, other.text
