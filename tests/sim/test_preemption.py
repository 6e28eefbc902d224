"""Compute preemption in the simulator (``fleet.sim.preemption``): the live dispatcher's
rule (``fleet.policy.preemption``) and check period, on virtual time."""

from __future__ import annotations

import json

from fleet.cli.simulate import _human
from fleet.policy.preemption import check_period_s
from fleet.sim import Simulation, parse_scenario, report_json
from fleet.sim.outcomes import OK

from .helpers import pool_spec, scenario_dict

CLASSES = [{"name": "urgent", "min_task_priority": 7}, {"name": "bulk"}]
HIGH, LOW = 9, 1
AFTER_S = 1.0
KEYS = ("preempted", "preempted_lost_s", "preempted_tasks", "preempted_max_per_task")


def _full_pool(
    enabled: bool,
    agents: int = 10,
    service: dict | None = None,
    high_per_s: float = 0.04,
    max_preemptions: int = 2,
    priorities: dict[int, float] | None = None,
) -> dict:
    """A fixed pool of ``agents`` running tasks of ``service`` (50 s each by default),
    kept full by a stream of low-priority tasks (0.3/s, above what it serves), and a
    trickle of high-priority ones, for 300 s."""
    auto = {"min_agents": agents, "max_agents": agents, "control_interval_s": 1000.0}
    preemption = {
        "enabled": enabled,
        "preempt_after_s": AFTER_S,
        "max_preemptions": max_preemptions,
    }
    return scenario_dict(
        pools=[pool_spec("work", agents=agents, autoscaling=auto, preemption=preemption)],
        models={"work": {"service": service or {"kind": "constant", "value_s": 50.0}}},
        workload=[
            {
                "pool": "work",
                "priorities": priorities or {LOW: 1},
                "arrivals": {"kind": "poisson", "rate_per_s": 0.3},
            },
            {
                "pool": "work",
                "priorities": {HIGH: 1},
                "arrivals": {"kind": "poisson", "rate_per_s": high_per_s},
            },
        ],
        fleet={"queues": {"discipline": "priority"}, "budgets": {"priority_classes": CLASSES}},
        max_tasks=None,
        duration_s=300,
    )


def _run(data: dict) -> Simulation:
    return Simulation(parse_scenario(data)).run()


def _high_waits(sim: Simulation) -> list[float]:
    """Each high-priority task's wait for its (only) start."""
    return [
        sim.start_t[t] - sim.submit_t[t]
        for t in range(sim.submitted)
        if sim.task_prio[t] == HIGH
    ]


def test_an_urgent_task_starts_within_preempt_after_s_and_one_check_period():
    sim = _run(_full_pool(True))
    r = sim.report()
    work = r["pools"]["work"]
    # A high task that finds the pool full waits preempt_after_s, then at most one check
    # period until the check that preempts a low task for it; the slot is its at once.
    bound = AFTER_S + check_period_s(AFTER_S)
    waits = _high_waits(sim)
    assert len(waits) > 10 and max(waits) <= bound + 1e-9, (bound, sorted(waits))
    assert work["preempted"] >= 5
    # Preempted tasks went back to the queue and completed later; nothing failed or was
    # lost by preemption, and each preempted run's delivery was refunded.
    assert r["lost"] == 0 and r["failed"] == 0 and r["drained"]
    log = [e for e in r["event_log"] if e["kind"] == "preempt"]
    assert len(log) == work["preempted"] == r["events_by_kind"]["preempt"]
    for e in log:
        tid = e["task"]
        assert e["priority"] == LOW and e["urgent_priority"] == HIGH
        assert sim.outcome[tid] == OK and sim.start_t[tid] > e["t_s"]
        assert sim.deliveries[tid] == 1
    assert 0 < work["preempted_max_per_task"] <= 2
    assert work["preempted_tasks"] <= work["preempted"]
    # The work lost: what the cut runs had done, each less than a whole run.
    lost = sum(e["lost_s"] for e in log)
    assert abs(work["preempted_lost_s"] - lost) < 1e-3 and 0 < lost < 50.0 * len(log)
    assert f"preempted {work['preempted']} runs" in _human(r)

    # Without preemption the same high tasks wait for a low one to end.
    off = _run(_full_pool(False))
    off_waits = _high_waits(off)
    assert max(off_waits) > 5 * bound
    assert sum(off_waits) / len(off_waits) > 3 * sum(waits) / len(waits)
    assert not any(k in off.report()["pools"]["work"] for k in KEYS)


def test_a_task_preempted_max_preemptions_times_runs_to_its_end():
    """A small pool where the task sent last is often one that was preempted before:
    at max_preemptions it runs to its end, and another task gives way. (Some are cut
    again on the agent whose cut run's completion is still pending: only the current
    run's completion may be made stale.)"""
    kw = {"agents": 4, "service": {"kind": "exponential", "mean_s": 20.0}, "high_per_s": 0.1}
    capped = _run(_full_pool(True, max_preemptions=2, **kw))
    counts = capped.pools[0].preemption.counts
    assert max(counts.values()) == 2
    assert capped.report()["pools"]["work"]["preempted_max_per_task"] == 2
    assert capped.report()["lost"] == 0
    # Uncapped, the same run preempts some task a third time: the cap was what held.
    loose = _run(_full_pool(True, max_preemptions=10, **kw))
    assert max(loose.pools[0].preemption.counts.values()) > 2


def test_preemption_that_finds_no_victim_changes_nothing_else():
    """Every task is of the top class, so no run may give way: the checks run (an event
    each period) and the rest of the report is the report without preemption."""
    top = {HIGH: 1, 8: 1}
    on = _run(_full_pool(True, priorities=top)).report()
    off = _run(_full_pool(False, priorities=top)).report()
    assert on["pools"]["work"]["preempted"] == 0
    assert on["events"] > off["events"]  # the checks
    for r in (on, off):
        del r["events"]
        for k in KEYS:
            r["pools"]["work"].pop(k, None)
    assert json.loads(report_json(on, timing=False)) == json.loads(
        report_json(off, timing=False)
    )


def test_a_task_its_tenants_bulkhead_holds_back_is_not_urgent():
    """A high task whose tenant has its in-flight limit running would not take the
    slot a preemption frees (a low task would): as a shard's ``urgent``, it does not
    count, so every preemption hands its slot to a high task."""
    data = _full_pool(True, high_per_s=0.015)
    data["workload"][0]["tenants"] = {"bulk": 1}
    data["workload"][1]["tenants"] = {"vip": 1}
    data["fleet"]["queues"]["shards"] = 1
    data["fleet"]["bulkheads"] = {"tenants": {"vip": {"max_in_flight": 1}}}
    sim = _run(data)
    r = sim.report()
    assert r["pools"]["work"]["overload"]["bulkheads"]["held_back_total"] > 0
    starts = {sim.start_t[t] for t in range(sim.submitted) if sim.task_prio[t] == HIGH}
    cuts = [e["t_s"] for e in r["event_log"] if e["kind"] == "preempt"]
    assert cuts and all(t in starts for t in cuts)
    assert r["lost"] == 0
