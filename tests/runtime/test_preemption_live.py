"""Compute preemption live (``pools[].preemption``): a pool full of low-priority 4 s
tasks; an urgent task that has waited past ``preempt_after_s`` takes the slot of one
running low-priority task, which goes back to the queue (its delivery refunded) and
completes later. Nothing is lost and nothing fails by preemption. How soon the urgent
task starts is a benchmark figure (BENCHMARKS.md), not this test's."""

from __future__ import annotations

from fleet.cli.status import _human
from tests.utils import eventually, make_spec, pool

LOW_S = 4.0  # long enough that a preemption lands before the first ones end
LOW = 4


def test_an_urgent_task_preempts_one_running_low_priority_task(start_fleet):
    spec = make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=0,
            agents_per_host=2,
            agent_kwargs={"delay_s": LOW_S},
            autoscaling={"min_agents": 2, "max_agents": 2, "initial_agents": 2},
            preemption={"enabled": True, "preempt_after_s": 0.5},
        ),
        name="preempt",
        namespace="preempt",
        queues={"discipline": "priority"},
        budgets={
            "priority_classes": [
                {"name": "urgent", "min_task_priority": 7},
                {"name": "bulk"},
            ]
        },
    )
    fc = start_fleet(spec)
    low = fc.submit(
        [{"capability": "work", "id": f"low{k}", "priority": 1} for k in range(LOW)]
    ).accepted
    eventually(lambda: fc.status()["pools"]["work"].get("in_flight") == 2, 30, 0.1, "full")
    urgent = fc.submit(
        [{"capability": "work", "id": "urgent", "priority": 9, "payload": {"sleep_s": 0.05}}]
    ).accepted
    assert fc.wait(low + urgent, timeout_s=60) == []
    results = {r.task_id: r for r in fc.results(low + urgent)}
    assert all(r.status.value == "completed" for r in results.values())  # 0 failed
    # Every delivery that ran to its end is the task's first: the preempted run's
    # delivery was refunded.
    assert {r.deliveries for r in results.values()} == {1}
    first = results["urgent"].started_unix_s
    # Without preemption the two running low tasks started before it; with it one of
    # them was cut and ran again after it: all low tasks but one started later.
    later = [i for i in low if results[i].started_unix_s > first]
    assert len(later) == LOW - 1, {i: results[i].started_unix_s - first for i in low}
    disp = fc.status()["pools"]["work"]
    assert disp["preempted"] == 1
    assert "preempted 1" in _human(fc.status())
    print(f"urgent task waited {first - results['urgent'].submitted_unix_s:.2f} s")
