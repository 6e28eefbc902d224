"""The runtime on the session's local Ray cluster: submit to ledger, autoscaling both
ways, a killed host's leased work redelivered, and exactly-once recording."""

from __future__ import annotations

import itertools
import time

import pytest
import ray

from fleet.runtime.ledger import Ledger
from fleet.task import Outcome
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray
_ids = itertools.count()


def _spec(**pool_kw):
    n = next(_ids)
    return make_spec(pool("work", agent_class="fleet.agents.testing:SleepAgent", cpus_per_host=0,
                          **pool_kw),
                     name=f"t{n}", namespace=f"fleet-test-{n}", queues={"lease_s": 20})



def test_submit_dispatch_and_failures_carry_reasons(start_fleet):
    fc = start_fleet(_spec(agent_kwargs={"delay_s": 0.0},
                           autoscaling={"min_agents": 20, "max_agents": 20}))
    tasks = [{"capability": "work", "payload": {"i": i, **({"fail": f"no {i}"} if i % 50 == 0
                                                            else {})}} for i in range(1000)]
    rep = fc.submit(tasks + [{"capability": "nope"}])
    assert len(rep.accepted) == 1000 and rep.rejected[0][0] == 1000
    assert fc.wait(rep.accepted, timeout_s=120) == []
    s = fc.summary(rep.accepted)
    assert (s["completed"], s["failed"], s["lost"]) == (980, 20, 0)
    assert s["failure_reasons"] == {"error": 20}
    bad = fc.results([rep.accepted[50]])[0]
    assert bad.status == "failed" and "ValueError: asked to fail: no 50" in bad.error
    good = fc.results([rep.accepted[1]])[0]
    assert good.status == "completed" and good.output == {"i": 1}
    # The fleet keeps running after agents raised.
    more = fc.submit([{"capability": "work", "payload": {"x": 1}}]).accepted
    assert fc.wait(more, timeout_s=30) == []


def test_autoscale_up_then_down_within_bounds(start_fleet):
    spec = _spec(agent_kwargs={"delay_s": 0.05}, agents_per_host=10,
                 autoscaling={"min_agents": 2, "max_agents": 40, "target_queued_per_agent": 5,
                              "control_interval_s": 0.25, "upscale_within_s": 1,
                              "downscale_within_s": 2, "downscale_stabilization_s": 1})
    fc = start_fleet(spec)
    ids = fc.submit([{"capability": "work"} for _ in range(1500)]).accepted
    assert fc.wait(ids, timeout_s=120) == []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and fc.status()["pools"]["work"]["agents"] > 2:
        time.sleep(0.25)
    tl = fc.timeline()
    agents = [s["agents"] for s in tl]
    assert max(agents) == 40, "a deep queue must scale to the bound"
    assert agents[-1] == 2, "a drained queue must scale back to the minimum"
    assert all(2 <= a <= 40 for a in agents)
    peak = agents.index(max(agents))
    assert any(s["queue_depth"] > 0 for s in tl[:peak + 1])
    assert max(s["hosts"] for s in tl) > 1, "hosts must follow the agents"
    assert fc.summary(ids)["lost"] == 0
    # Rates, from the controller's own decisions: no step beyond what the elapsed time
    # allows ((max - min) / within_s agents per second, plus the one agent of carry).
    a = spec.pools[0].autoscaling
    up_rate = (a.max_agents - a.min_agents) / a.upscale_within_s
    down_rate = (a.max_agents - a.min_agents) / a.downscale_within_s
    ticks = list(zip(tl, tl[1:]))
    for prev, cur in ticks:
        dt = max(cur["t_s"] - prev["t_s"], a.control_interval_s)
        step = cur["agents"] - prev["agents"]
        assert step <= up_rate * dt + 1 and -step <= down_rate * dt + 1, (prev, cur)
    # The target is reached within the rate limit plus one (observed) control interval.
    asked = next(s for s in tl if s["raw_desired"] == a.max_agents)
    reached = next(s for s in tl if s["agents"] == a.max_agents)
    longest_tick = max(cur["t_s"] - prev["t_s"] for prev, cur in ticks)
    assert reached["t_s"] - asked["t_s"] <= (a.max_agents - a.min_agents) / up_rate + longest_tick


def test_killed_host_work_is_redelivered_and_recorded_once(start_fleet):
    # 2 s tasks, so that a host killed while the pool is busy is surely mid-batch.
    fc = start_fleet(_spec(agent_kwargs={"delay_s": 2.0}, agents_per_host=50,
                           autoscaling={"min_agents": 100, "max_agents": 100}))
    ids = fc.submit([{"capability": "work"} for _ in range(600)]).accepted
    replicas = []
    deadline = time.monotonic() + 30
    while len(replicas) < 2 and time.monotonic() < deadline:
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::") and
                    f"{fc.spec.name}-work" in a["name"]]
        time.sleep(0.2)
    # Kill only once hosts are executing (outcomes recorded) and the pool is saturated
    # again, so that both hosts hold leased work mid-batch.
    while (fc.summary(ids)["recorded"] < 100 or
           fc.status()["pools"]["work"]["in_flight"] < 100) and time.monotonic() < deadline + 60:
        time.sleep(0.05)
    assert fc.summary(ids)["recorded"] < 600, "the kill must land mid-run"
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    # Kill every host of the pool: Serve replaces them, and all leased work must
    # come back through the queue.
    for r in replicas:
        ray.kill(ray.get_actor(r["name"], namespace=r["namespace"]), no_restart=True)
    assert fc.wait(ids, timeout_s=120) == []
    s = fc.summary(ids)
    st = fc.status()["pools"]["work"]
    assert (s["completed"], s["lost"], s["failed"]) == (600, 0, 0)
    assert st["host_failures"] >= 1 and st["queue"]["redelivered_total"] >= 1
    results = fc.results(ids)
    assert max(r.deliveries for r in results) >= 2, "some work ran twice: once per host"


def test_ledger_records_exactly_once(ray_cluster):
    ledger = Ledger.remote()
    o = Outcome("a", True, b"1", None, None, "ag", "p", 1, 1.0, 1.5, 2.0)
    later = o._replace(output=b"2", deliveries=2)
    assert ray.get(ledger.record.remote([o, o._replace(task_id="b")])) == 2
    assert ray.get(ledger.record.remote([later])) == 0
    assert ray.get(ledger.get.remote(["a"]))[0].output == b"1", "the first outcome wins"
    s = ray.get(ledger.summary.remote(["a", "b", "c"]))
    assert (s["recorded"], s["lost"], s["duplicate_executions"]) == (2, 1, 1)
    ray.kill(ledger)
