"""Rerun as little as possible, on the session's local Ray cluster: a host killed
mid-batch reruns only the tasks that had not finished, and a task that kills every host
it runs on fails alone (``host_crash``) while its 200 batch-mates complete."""

from __future__ import annotations

import itertools
import time

import pytest
import ray

from tests.utils import eventually, make_spec, pool

pytestmark = pytest.mark.ray
_ids = itertools.count()


def _replicas(fc) -> list[dict]:
    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"{fc.spec.name}-work" in a["name"]
    ]


def test_a_host_killed_mid_batch_reruns_only_its_unfinished_tasks(start_fleet):
    n = next(_ids)
    agents = 50
    fc = start_fleet(
        make_spec(
            pool(
                "work",
                agent_class="fleet.agents.testing:SleepAgent",
                cpus_per_host=0,
                agents_per_host=agents,
                autoscaling={"min_agents": agents, "max_agents": agents},
            ),
            name=f"rerun{n}",
            namespace=f"fleet-rerun-{n}",
            queues={"lease_s": 30, "shards": 1},
        )
    )
    # Short and long tasks interleaved, so that every batch mixes them.
    tasks = [
        {"capability": "work", "payload": {"i": i, "sleep_s": 5.0 if i % 4 == 0 else 0.05}}
        for i in range(300)
    ]
    ids = fc.submit(tasks).accepted
    slow = {i for i, t in zip(ids, tasks) if t["payload"]["sleep_s"] == 5.0}
    replicas = eventually(lambda: _replicas(fc), 30, what="the pool's host")
    # Kill once long tasks hold slots and short ones keep being recorded around them.
    eventually(lambda: fc.summary(ids)["recorded"] >= 100, 60, what="100 recorded")
    before = {r.task_id: r for r in fc.results(ids) if r is not None}
    assert len(before) < len(ids), "the kill must land mid-run"
    t_kill = time.time()
    for r in replicas:
        ray.kill(ray.get_actor(r["name"], namespace=r["namespace"]), no_restart=True)
    assert fc.wait(ids, timeout_s=180) == []
    s = fc.summary(ids)
    assert (s["completed"], s["lost"], s["failed"]) == (300, 0, 0), s
    st = fc.status()["pools"]["work"]
    assert st["host_failures"] >= 1 and st["queue"]["redelivered_total"] >= 1, st
    after = {r.task_id: r for r in fc.results(ids)}
    # What was recorded before the kill is what is recorded after it.
    assert all(after[i] == r for i, r in before.items())
    reruns = {i for i, r in after.items() if r.deliveries > 1}
    assert reruns, "some tasks were running at the kill"
    # Every duplicate execution is a recorded rerun: no task recorded before the kill (or
    # finished and recorded during it) ran again, which would count without a rerun.
    assert s["duplicate_executions"] == len(reruns), (s["duplicate_executions"], len(reruns))
    # Only the tasks running at the kill ran again: at most one per agent slot. (With
    # outcomes recorded per batch, every short task waiting on a long batch-mate reran.)
    assert len(reruns) <= agents, (len(reruns), len(reruns & slow))
    # The reruns finished after the kill; the short tasks recorded from a first delivery
    # finished before it or ran after it, never across it twice.
    assert all(after[i].finished_unix_s > t_kill for i in reruns)
    print(
        f"recorded before the kill {len(before)}; rerun {len(reruns)} "
        f"({len(reruns & slow)} long, {len(reruns - slow)} short); "
        f"duplicate executions {s['duplicate_executions']}"
    )


def test_a_task_that_kills_its_host_fails_alone_and_its_batch_mates_complete(start_fleet):
    n = next(_ids)
    fc = start_fleet(
        make_spec(
            pool(
                "work",
                agent_class="fleet.agents.testing:SleepAgent",
                cpus_per_host=0,
                agents_per_host=256,
                autoscaling={"min_agents": 256, "max_agents": 256},
            ),
            name=f"poison{n}",
            namespace=f"fleet-poison-{n}",
            resilience={"max_deliveries": 3},
            queues={"lease_s": 60, "shards": 1},
        )
    )
    innocent = [
        {"capability": "work", "payload": {"i": i, "sleep_s": 0.01}} for i in range(200)
    ]
    poison = {"capability": "work", "payload": {"exit": True}}
    ids = fc.submit([*innocent[:100], poison, *innocent[100:]]).accepted  # one batch
    assert fc.wait(ids, timeout_s=240) == []
    results = {r.task_id: r for r in fc.results(ids)}
    bad = results[ids[100]]
    assert (bad.status, bad.reason) == ("failed", "host_crash"), bad
    assert bad.deliveries == 3
    assert all(results[i].status == "completed" for i in ids if i != ids[100])
    st = fc.status()["pools"]["work"]
    assert st["crashed_batches"] >= 3, st  # at least one crash per delivery of the poison
    print(
        f"crashed batches {st['crashed_batches']}; innocent deliveries "
        f"{sorted({results[i].deliveries for i in ids if i != ids[100]})}"
    )
