"""Control actors killed while pools shed, degrade and preempt: nothing accepted is
lost, and overload protection resumes by itself.

One fleet on durable queues, fed through the Python API: a pool of 8 agents with
admission control (1 s) and a degrade rule to a small fallback pool (admission control
on it too), offered about four times what it drains; and a pool of 4 agents with
compute preemption, kept full of 1 s bulk tasks while urgent ones keep arriving.
While that runs the controller (which publishes the admission views, steps the degrade
rule and counts shed demand) and then the dispatcher (which preempts) are killed; Ray
restarts each. The test checks: every accepted task has an outcome and none failed;
tasks were refused both before the first kill and after the controller came back (its
views resumed); some results were degraded; some runs were preempted.
"""

from __future__ import annotations

import time
import uuid

import pytest
import ray

from fleet.bench.durability import target_name
from fleet.runtime.lifecycle import actor_states
from tests.utils import eventually, make_spec, pool

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RUN_S = 14.0
BATCH = 15
EVERY_S = 0.1  # 150 tasks/s offered to a pool that drains 40/s (8 agents, 0.2 s)
WORK_S = 0.2
KILLS = {"controller": 4.0, "dispatcher": 9.0}  # seconds into the run
URGENT_S, BULK_S = 0.05, 1.0  # the preempting pool's tasks: 2 bulk, 1 urgent per 0.5 s


def _spec(directory: str):
    return make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=0,
            agents_per_host=8,
            agent_kwargs={"delay_s": WORK_S},
            autoscaling={
                "min_agents": 8,
                "max_agents": 8,
                "initial_agents": 8,
                "control_interval_s": 0.5,
            },
            admission={"enabled": True, "max_queue_wait_s": 1.0},
            degrade={"to_pool": "lite", "predicted_wait_s": 0.5, "recover_after_s": 1.0},
        ),
        pool(
            "batch",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=0,
            agents_per_host=4,
            autoscaling={"min_agents": 4, "max_agents": 4, "initial_agents": 4},
            preemption={"enabled": True, "preempt_after_s": 0.2},
        ),
        pool(
            "lite",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=0,
            agents_per_host=4,
            autoscaling={"min_agents": 4, "max_agents": 4, "initial_agents": 4},
            admission={"enabled": True, "max_queue_wait_s": 1.0},
        ),
        name="overkill",
        namespace=f"overkill-{uuid.uuid4().hex[:6]}",
        queues={"discipline": "priority", "storage": {"directory": directory}},
        budgets={
            "priority_classes": [
                {"name": "urgent", "min_task_priority": 7},
                {"name": "bulk", "shed_wait_share": 0.5},
            ]
        },
    )


def _batch(prefix: str, n: int) -> list[dict]:
    work = [
        {"id": f"{prefix}-{k}", "capability": "work", "priority": 9 if k % 2 else 1}
        for k in range(BATCH)
    ]
    if n % 5:
        return work
    bulk = {"capability": "batch", "priority": 1, "payload": {"sleep_s": BULK_S}}
    urgent = {"capability": "batch", "priority": 9, "payload": {"sleep_s": URGENT_S}}
    return [*work, bulk, bulk, urgent]


@pytest.mark.timeout(300)
def test_killed_control_actors_lose_nothing_while_shedding_degrading_and_preempting(
    start_fleet, tmp_path
):
    fc = start_fleet(_spec(str(tmp_path)))
    ns = fc.spec.namespace
    # Warm up: the controller measures what the pool drains.
    warm = fc.submit([{"capability": "work"} for _ in range(40)]).accepted
    eventually(
        lambda: fc.status()["pools"]["work"]["admission"]["drain_per_s"], 30, 0.2, "a rate"
    )
    accepted: list[str] = list(warm)
    refused = {"before": 0, "after": 0}
    preempted_max = 0  # the dispatcher's count starts again when it restarts
    kills = dict(KILLS)
    t0 = time.monotonic()
    n = 0
    while (now := time.monotonic() - t0) < RUN_S:
        for target, at in list(kills.items()):
            if now >= at:
                name = target_name(fc.spec, target)
                ray.kill(ray.get_actor(name, namespace=ns), no_restart=False)
                del kills[target]
        report = fc.submit(_batch(f"b{n}", n))
        accepted += report.accepted
        if now < KILLS["controller"]:
            refused["before"] += len(report.refused)
        elif now > KILLS["controller"] + 2.0:  # restarted and publishing again
            refused["after"] += len(report.refused)
        if n % 10 == 0:
            try:
                preempted = fc.status()["pools"]["batch"].get("preempted", 0)
                preempted_max = max(preempted_max, preempted)
            except Exception:  # a control actor restarting: status can wait
                pass
        n += 1
        time.sleep(max(0.0, t0 + n * EVERY_S - time.monotonic()))

    missing = fc.wait(accepted, timeout_s=180)
    assert missing == [], f"{len(missing)} accepted task(s) lost"
    states = actor_states(ns, [target_name(fc.spec, t) for t in KILLS])
    assert {s["state"] for s in states.values()} == {"ALIVE"}, states
    assert all(s["restarts"] >= 1 for s in states.values()), states
    results = fc.results(accepted)
    assert [r.task_id for r in results if r.status.value != "completed"] == []
    degraded = sum(1 for r in results if r.degraded)
    seen = f"accepted {len(accepted)}, refused {refused}, degraded {degraded}"
    assert refused["before"] > 0, f"no shedding before the kills: {seen}"
    assert refused["after"] > 0, f"no shedding after the controller came back: {seen}"
    assert degraded > 0, f"nothing was degraded: {seen}"
    preempted_max = max(preempted_max, fc.status()["pools"]["batch"].get("preempted", 0))
    assert preempted_max > 0, f"nothing was preempted: {seen}"
    print(f"{seen}, preempted (most seen at once) {preempted_max}")
