"""Queues on the live runtime: deadlines fail loudly, a durable shard survives kill -9 of
the shard and of the driver."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fleet.observability import scrape
from fleet.runtime.client import FleetClient
from fleet.runtime.deploy import teardown
from fleet.runtime.names import Names
from tests.utils import eventually, make_spec, pool

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
_ids = itertools.count()


def _spec(queues, **pool_kw):
    n = next(_ids)
    return make_spec(
        pool(
            "work", agent_class="fleet.agents.testing:SleepAgent", cpus_per_host=0, **pool_kw
        ),
        name=f"q{n}",
        namespace=f"fleet-qtest-{n}",
        queues=queues,
    )


def test_task_past_its_deadline_fails_with_reason_and_is_recorded(start_fleet):
    # One agent busy for 2 s: the task behind it misses its 0.5 s deadline.
    fc = start_fleet(
        _spec(
            {"lease_s": 20},
            agent_kwargs={"delay_s": 2.0},
            autoscaling={"min_agents": 1, "max_agents": 1},
        )
    )
    blocker = fc.submit([{"capability": "work"}]).accepted
    eventually(
        lambda: fc.status()["pools"]["work"]["queue"]["leased"] >= 1,
        30,
        what="the blocker leased to the only agent",
    )
    late = fc.submit([{"capability": "work", "deadline_unix_s": time.time() + 0.5}]).accepted
    assert fc.wait(blocker + late, timeout_s=60) == []
    r = fc.results(late)[0]
    assert (r.status, r.reason) == ("failed", "deadline_exceeded")
    assert fc.summary(blocker + late)["lost"] == 0


def test_sqlite_shard_killed_mid_run_loses_nothing(start_fleet, tmp_path):
    spec = _spec(
        {
            "shards": 1,
            "lease_s": 5,
            "storage": {"backend": "sqlite", "directory": str(tmp_path)},
        },
        agent_kwargs={"delay_s": 0.02},
        autoscaling={"min_agents": 50, "max_agents": 50},
    )
    fc = start_fleet(spec)
    ids = fc.submit(
        [{"capability": "work", "payload": {"i": i}} for i in range(5_000)]
    ).accepted
    shard = ray.get_actor(Names(spec.name).shard("work", 0), namespace=spec.namespace)
    eventually(lambda: fc.summary(ids)["recorded"] >= 500, 120, 0.1, what="500 recorded")
    pid = ray.get(shard.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    assert fc.summary(ids)["recorded"] < 5_000, (
        "the kill must land mid-run"
    )  # the shard restarts and reloads from SQLite
    assert fc.wait(ids, timeout_s=180) == []
    s = fc.summary(ids)
    assert (s["recorded"], s["completed"], s["lost"]) == (5_000, 5_000, 0)
    assert ray.get(shard.__ray_call__.remote(lambda self: os.getpid())) != pid


def test_depth_alert_fires_in_status_and_metrics_then_clears(start_fleet):
    fc = start_fleet(
        _spec(
            {"lease_s": 20, "alerts": ["depth > 50"]},
            # 400 tasks on 2 agents at 40 ms: ~8 s above the threshold, time for the
            # alert gauge to reach Ray's metrics agent while it fires.
            agent_kwargs={"delay_s": 0.04},
            autoscaling={"min_agents": 2, "max_agents": 2, "control_interval_s": 0.25},
        )
    )
    ids = fc.submit([{"capability": "work"} for _ in range(400)]).accepted
    active = eventually(
        lambda: fc.status()["alerts"]["active"], 30, 0.1, what="the depth alert fires"
    )
    assert active[0]["subject"].startswith("work"), active
    # The controller exports the firing alert and the queue's counters (~1 s to arrive).
    rule, subject = active[0]["rule"], active[0]["subject"]

    def exported(name: str, want: float, **labels: str):
        def check() -> bool:
            got = scrape.total(fc.metrics_text(), name, **labels)
            assert got == want, got
            return True

        return check

    firing = {"rule": rule, "subject": subject, "fleet": fc.spec.name}
    eventually(exported("ray_fleet_alerts_firing", 1.0, **firing), 15, 0.2, what="alert at 1")
    enqueued = exported(
        "ray_fleet_queue_enqueued_total", len(ids), queue="work", fleet=fc.spec.name
    )
    eventually(enqueued, 15, 0.5, what="the queue's enqueued total exported")
    assert fc.wait(ids, timeout_s=60) == []
    eventually(
        lambda: not fc.status()["alerts"]["active"],
        10,
        0.1,
        what="the alert clears once the queue drains",
    )
    eventually(exported("ray_fleet_alerts_firing", 0.0, **firing), 15, 0.5, what="alert at 0")
    st = fc.status()["alerts"]
    assert st["active"] == [], "the alert must clear once the queue drains"
    kinds = [e["kind"] for e in st["events"]]
    assert kinds == ["fired", "cleared"], kinds


def test_a_shard_sizes_each_batch_from_its_own_depth(ray_cluster):
    from fleet.runtime.queue_actor import QueueShard
    from fleet.spec.queues import QueueSpec
    from fleet.task import to_item

    spec = QueueSpec.model_validate(
        {"batch": {"max_items": 4}, "lease_s": 30, "storage": {"backend": "memory"}}
    )
    shard = QueueShard.remote(
        "work", 0, spec.model_dump(mode="json"), 3, "no-ledger", "fleet-qtest-batch"
    )
    try:
        items = [
            to_item({"capability": "work", "payload": {"i": i}}, {"work"}) for i in range(6)
        ]
        ray.get(shard.put.remote(items))
        got, left = ray.get(shard.lease_batch.remote(100, "d"))  # bounded by max_items
        assert (len(got), left) == (4, 2)
        got, left = ray.get(shard.lease_batch.remote(1, "d"))  # bounded by free slots
        assert (len(got), left) == (1, 1)
        got, left = ray.get(shard.lease_batch.remote(100, "d"))  # what is left
        assert (len(got), left) == (1, 0)
        assert ray.get(shard.lease_batch.remote(100, "d")) == ([], 0)
        assert ray.get(shard.lease_batch.remote(0, "d")) == ([], 0)
    finally:
        ray.kill(shard)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.timeout(300)
def test_driver_killed_mid_run_every_accepted_task_completes_once(ray_cluster, tmp_path):
    # A detached fleet on SQLite queues outlives the driver that started it; a new driver
    # connects by name and finds every task the first one was told was accepted.
    # FLEET_DRIVER_KILL_TASKS=100000 runs it at the full size (BENCHMARKS.md).
    tasks, chunk = int(os.environ.get("FLEET_DRIVER_KILL_TASKS", 20_000)), 1_000
    spec = _spec(
        {
            "shards": 2,
            "lease_s": 10,
            "storage": {"backend": "sqlite", "directory": str(tmp_path / "queues")},
        },
        agent_kwargs={"delay_s": 0.005},
        agents_per_host=50,
        autoscaling={"min_agents": 100, "max_agents": 100},
    )
    spec_file, ids_file = tmp_path / "spec.json", tmp_path / "accepted.txt"
    spec_file.write_text(spec.model_dump_json())
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.runtime.driver_worker",
            ray_cluster.address_info["gcs_address"],
            str(spec_file),
            str(ids_file),
            str(tasks),
            str(chunk),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def a_quarter_accepted() -> bool:
            if driver.poll() is not None:  # it died: stop waiting, show why
                pytest.fail(driver.stderr.read().decode()[-3000:])
            return len(_lines(ids_file)) >= tasks // 4

        eventually(a_quarter_accepted, 120, what="the driver accepting a quarter")
        driver.send_signal(signal.SIGKILL)  # no teardown, no goodbye
        driver.wait(timeout=30)
        accepted = _lines(ids_file)
        assert len(accepted) < tasks, "the driver finished before it was killed"

        fc = FleetClient.connect(spec.name, spec.namespace)
        assert fc.wait(accepted, timeout_s=180) == []
        s = fc.summary(accepted)
        assert (s["recorded"], s["completed"], s["lost"]) == (len(accepted),) * 2 + (0,)
        # Nothing recorded beyond what was submitted: one ledger entry per task.
        assert len(accepted) <= fc.status()["ledger"]["recorded"] <= len(accepted) + chunk
        print(
            f"\ndriver kill -9: {len(accepted)} accepted before the kill, all recorded "
            f"once; {s['duplicate_executions']} duplicate executions"
        )
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        teardown(spec)
        left = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == spec.namespace
        ]
        assert left == [], left
