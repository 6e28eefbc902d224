"""Admission control live (``fleet.policy.admission`` at the entry points): an
overloaded pool refuses at once over HTTP with a ``Retry-After`` computed from its
drain rate and the ids it did not take; and shed demand grows a pool with headroom
until it stops shedding. Figures (goodput, latencies) are ``fleet bench overload``'s."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import httpx
import ray

from fleet.cli.common import EXIT_INCOMPLETE
from fleet.cli.main import main as cli
from fleet.policy.sharding import shard_of
from fleet.runtime.admission_gate import Refused
from fleet.task import Item
from tests.security._live import ingress_fleet
from tests.utils import eventually, make_spec, pool

SLEEP = "fleet.agents.testing:SleepAgent"


def _sleep_pool(
    delay_s: float, max_agents: int, max_wait_s: float, agents_per_host: int = 100, **scaling
) -> dict:
    """Pool ``work`` of sleeping agents, starting at 2, admission control on."""
    return pool(
        "work",
        agent_class=SLEEP,
        cpus_per_host=0,
        agents_per_host=agents_per_host,
        agent_kwargs={"delay_s": delay_s},
        autoscaling={
            "min_agents": 2,
            "max_agents": max_agents,
            "initial_agents": 2,
            "control_interval_s": 0.5,
            **scaling,
        },
        admission={"enabled": True, "max_queue_wait_s": max_wait_s},
    )


def _status(fc) -> dict:
    return fc.status()["pools"]["work"]


def test_an_overloaded_pool_answers_429_with_retry_after_from_its_drain_rate(
    ray_cluster, tmp_path, capsys
):
    max_wait_s = 1.0
    spec = make_spec(
        _sleep_pool(0.2, max_agents=2, max_wait_s=max_wait_s),
        name="admit-http",
        namespace="admit-http",
        ingress={"auth": {"mode": "none"}},
    )
    with ingress_fleet(spec, "/admit-http") as (fc, url):
        # A backlog of 20 s of work (2 agents of 0.2 s: 10 tasks/s), queued as work
        # already admitted, then the controller's measure of the drain rate.
        items, _ = fc.validate([{"capability": "work", "id": f"b{k}"} for k in range(200)])
        fc.submit_items(items)
        drain = eventually(
            lambda: _status(fc)["admission"]["drain_per_s"], 30, 0.2, "a measured drain rate"
        )
        assert 2 <= drain <= 50, drain  # 10/s give or take the estimator's noise
        ids = [f"x{k}" for k in range(5)]
        r = httpx.post(
            f"{url}/tasks", json=[{"capability": "work", "id": i} for i in ids], timeout=30
        )
        assert r.status_code == 429, r.text
        body = r.json()
        assert body["accepted"] == []
        assert sorted(n["id"] for n in body["not_queued"]) == ids
        assert {n["reason"] for n in body["not_queued"]} == {"shed"}
        waits = [n["predicted_wait_s"] for n in body["not_queued"]]
        # About 200 ahead at the measured rate: seconds, far over the limit of 1 s.
        assert min(waits) > 5 * max_wait_s, waits
        retry = math.ceil(max(waits) - max_wait_s)  # when the wait is back within it
        assert r.headers["Retry-After"] == str(retry) == str(body["retry_after_s"])
        assert "resubmit them with the same ids" in body["detail"]
        # Nothing of a refused task was queued.
        assert httpx.get(f"{url}/tasks/{ids[0]}", timeout=30).status_code == 404
        # The refusals reached the controller: counted by class and reason.
        refused = eventually(
            lambda: _status(fc)["admission"]["refused"], 10, 0.2, "refusals counted"
        )
        assert refused == {"default": {"shed": len(ids)}}

        # `fleet submit`: the refused tasks by number and id, exit 1, nothing queued.
        path = tmp_path / "tasks.jsonl"
        path.write_text("".join(f'{{"capability": "work", "id": "c{k}"}}\n' for k in range(3)))
        args = ["submit", str(path), "--fleet", spec.name, "--namespace", spec.namespace]
        capsys.readouterr()
        assert cli([*args, "--json"]) == EXIT_INCOMPLETE
        out = json.loads(capsys.readouterr().out)
        assert out["ids"] == [] and [r["id"] for r in out["refused"]] == ["c0", "c1", "c2"]
        assert [r["task"] for r in out["refused"]] == [1, 2, 3]
        assert {r["reason"] for r in out["refused"]} == {"shed"}
        assert all(r["retry_after_s"] > 0 for r in out["refused"])
        shards = fc._shards["work"]
        held = ray.get(
            [shards[shard_of(i, len(shards))].known.remote([i]) for i in ("c0", "c1", "c2")]
        )
        assert held == [[False]] * 3  # not pending in any shard: never queued


def test_a_refusal_of_a_pool_that_cannot_run_is_503_naming_the_ids():
    from fleet.ingress import Ingress

    cls = Ingress.func_or_class
    me = SimpleNamespace(_retry_after_s=1)
    items = [Item(f"@t:{k}", "work", 5, b"null", 0.0) for k in range(3)]
    refused = [Refused(1, items[1].id, "unavailable", 1.0, None)]
    r = cls._refused(me, items, refused, [], "")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    body = r.body.decode()
    assert '"accepted":["0","2"]' in body.replace(" ", "")
    assert '"reason":"unavailable"' in body.replace(" ", "")
    shed = [Refused(0, items[0].id, "shed", 2.2, 3.2)]
    r = cls._refused(me, items, shed, [2], "queue full: 1 task(s) not queued")
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert '"accepted":["1"]' in r.body.decode().replace(" ", "")


def test_shed_demand_grows_a_pool_with_headroom_until_it_stops_shedding(start_fleet):
    spec = make_spec(
        _sleep_pool(
            0.1,
            max_agents=40,
            max_wait_s=1.0,
            agents_per_host=50,
            target_queued_per_agent=5,
            upscale_within_s=2,
        ),
        name="admit-scale",
        namespace="admit-scale",
    )
    fc = start_fleet(spec)
    # Light work first, so the controller has measured what the pool drains.
    warm = fc.submit([{"capability": "work"} for _ in range(20)]).accepted
    eventually(lambda: _status(fc)["admission"]["drain_per_s"], 30, 0.2, "a drain rate")

    def client_knows_the_drain() -> bool:
        fc.admission.refresh()
        load = fc.admission.policy.load("work")
        return load is not None and load.drain_per_s is not None

    eventually(client_knows_the_drain, 10, 0.1, "the client's view of the drain rate")
    accepted: list[str] = list(warm)
    # 5x the starting capacity (2 agents of 0.1 s: 20 tasks/s): 100 tasks/s, in
    # batches of 10, until 3 s in a row pass with nothing refused (at most 40 s).
    windows: list[tuple[int, int]] = []  # (offered, refused) per second
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 40:
        second = int(time.monotonic() - t0)
        while len(windows) <= second:
            windows.append((0, 0))
        report = fc.submit([{"capability": "work", "id": f"s{n + k}"} for k in range(10)])
        n += 10
        accepted += report.accepted
        off, ref = windows[second]
        windows[second] = (off + 10, ref + len(report.refused))
        if len(windows) > 4 and all(r == 0 and o > 0 for o, r in windows[-4:-1]):
            break
        time.sleep(0.1)
    shed_share = [r / o for o, r in windows if o]
    assert shed_share[0] > 0 or shed_share[1] > 0, windows  # 5x: it shed at first
    assert all(s == 0 for s in shed_share[-4:-1]), windows  # then it stopped
    # by growing the pool: 100 tasks/s need 10 agents of 0.1 s
    assert fc.status()["pools"]["work"]["agents"] >= 8
    assert fc.wait(accepted, timeout_s=60) == []  # every accepted task ran: 0 lost
    summary = fc.summary(accepted)
    assert summary["completed"] == len(accepted), summary
