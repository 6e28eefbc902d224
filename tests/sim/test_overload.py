"""Overload in the simulator (``fleet.sim.overload``): priorities, deadlines, admission
control and degradation, run by fleet's own policy objects on virtual time."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from fleet.bench.overload import simulate_level
from fleet.sim import ScenarioError, load_scenario, parse_scenario, simulate
from fleet.sim.overload import PriorityQueue

from .helpers import pool_spec, scenario_dict

SCENARIOS = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
CLASSES = [
    {"name": "high", "min_task_priority": 7, "shed_wait_share": 1.0},
    {"name": "normal", "min_task_priority": 4, "shed_wait_share": 0.7},
    {"name": "low", "min_task_priority": 0, "shed_wait_share": 0.5},
]


def test_priority_queue_serves_the_highest_priority_first_fifo_within_one():
    prio = bytearray([2, 8, 2, 5, 8, 0])
    q = PriorityQueue(prio)
    ref: deque[int] = deque()
    for tid in range(6):
        q.append(tid)
        ref.append(tid)
    assert len(q) == 6 and q and q[0] == 1
    assert [q.popleft() for _ in range(3)] == [1, 4, 3]
    q.appendleft(4)  # handed back: at the head of its priority again
    assert q.by_priority() == [1, 0, 2, 0, 0, 0, 0, 0, 1, 0]
    assert [q.popleft() for _ in range(4)] == [4, 0, 2, 5]
    assert not q and len(q) == 0
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(IndexError):
        q[0]


def _pinned(name: str, **kw) -> dict:
    """A pool of ten agents, autoscaling pinned, ticking every 0.5 s."""
    auto = {"min_agents": 10, "max_agents": 10, "control_interval_s": 0.5}
    return pool_spec(name, agents=10, autoscaling=auto, **kw)


def _overloaded(admission: bool, discipline: str = "priority", **stream) -> dict:
    """Ten agents of 0.1 s (100 tasks/s) offered 300 tasks/s for 20 s, three classes."""
    return scenario_dict(
        pools=[_pinned("work", admission={"enabled": admission})],
        models={"work": {"service": {"kind": "constant", "value_s": 0.1}}},
        workload=[
            {
                "pool": "work",
                "priorities": {8: 1, 5: 3, 2: 6},
                "arrivals": {"kind": "poisson", "rate_per_s": 300},
                **stream,
            }
        ],
        fleet={"queues": {"discipline": discipline}, "budgets": {"priority_classes": CLASSES}},
        max_tasks=None,
        duration_s=20,
    )


def test_the_priority_discipline_serves_high_priorities_first_and_deadlines_drop_tasks():
    r = simulate(parse_scenario(_overloaded(False, deadline_s=2.0)))
    o = r["pools"]["work"]["overload"]
    c = o["classes"]
    # High goes first: its tasks wait for a slot only; low ones wait out their deadline.
    assert c["high"]["latency_s"]["p99"] < 0.5
    assert c["high"]["goodput"] == c["high"]["offered"] > 0
    assert c["low"]["goodput"] < 0.2 * c["low"]["offered"]
    # Past their deadline they are dropped by the queue (no agent time), never lost.
    assert r["failed_by_reason"]["deadline_exceeded"] == o["deadline_dropped"] > 1000
    assert r["lost"] == 0 and r["drained"]
    assert r["completed"] + r["failed"] == r["submitted"] == o["offered"]
    # FIFO (no discipline): everyone waits behind everyone, high too.
    fifo = simulate(parse_scenario(_overloaded(False, "fifo", deadline_s=2.0)))
    assert fifo["pools"]["work"]["overload"]["classes"]["high"]["latency_s"]["p50"] > 1.0


def test_admission_sheds_low_first_keeps_high_and_holds_goodput():
    on = simulate(parse_scenario(_overloaded(True, deadline_s=2.0)))
    off = simulate(parse_scenario(_overloaded(False, deadline_s=2.0)))
    o, f = on["pools"]["work"]["overload"], off["pools"]["work"]["overload"]
    c = o["classes"]
    assert c["high"]["shed_share"] == 0.0
    assert c["low"]["shed_share"] > c["normal"]["shed_share"] > 0
    # Refused as they would miss their deadline (not past it): demand for agents.
    assert set(c["low"]["refused"]) <= {"shed", "deadline_unreachable"}
    # Refused tasks were never queued: what was admitted is what was submitted.
    assert o["admitted"] == on["submitted"] == o["offered"] - o["refused"]
    assert on["lost"] == 0
    # Goodput: at 3x, the admitted tasks keep the pool busy and mostly make their
    # deadline; without admission most of the pool's time goes to tasks that miss it.
    assert o["goodput_share"] > 0.9
    assert f["goodput_share"] < o["goodput_share"] - 0.15


def test_shed_demand_reaches_the_autoscaler():
    data = _overloaded(True, deadline_s=2.0)
    data["fleet"]["pools"][0]["autoscaling"] = {
        "min_agents": 10,
        "max_agents": 40,
        "control_interval_s": 0.5,
        "upscale_within_s": 5,
        "target_queued_per_agent": 2,
    }
    r = simulate(parse_scenario(data))
    o = r["pools"]["work"]["overload"]
    # The pool grows toward what the offered load needs (30 agents) and stops shedding.
    assert r["pools"]["work"]["agents"]["max"] >= 30
    assert o["shed_share"] < 0.2
    fixed = simulate(parse_scenario(_overloaded(True, deadline_s=2.0)))
    assert fixed["pools"]["work"]["overload"]["shed_share"] > 2 * o["shed_share"]


def _degrading() -> dict:
    """``work`` (10 agents of 0.1 s) degrades to ``lite`` (10 of 0.02 s) when its
    predicted wait passes 1 s; a 3x burst from 10 s to 30 s."""
    return scenario_dict(
        pools=[
            _pinned(
                "work",
                admission={"enabled": True},
                degrade={"to_pool": "lite", "predicted_wait_s": 1.0, "recover_after_s": 5},
            ),
            _pinned("lite"),
        ],
        models={
            "work": {"service": {"kind": "constant", "value_s": 0.1}},
            "lite": {"service": {"kind": "constant", "value_s": 0.02}},
        },
        workload=[
            {
                "pool": "work",
                "priorities": {8: 1, 2: 9},
                "arrivals": {
                    "kind": "poisson",
                    "rate_per_s": 50,
                    "bursts": [{"start_s": 10, "duration_s": 20, "multiplier": 6}],
                },
            }
        ],
        fleet={"queues": {"discipline": "priority"}, "budgets": {"priority_classes": CLASSES}},
        max_tasks=None,
        duration_s=60,
    )


def test_degradation_sends_new_tasks_to_the_fallback_and_ends_after_the_burst():
    r = simulate(parse_scenario(_degrading()))
    work, lite = r["pools"]["work"]["overload"], r["pools"]["lite"]["overload"]
    assert work["degraded"] > 0 and work["degraded"] == sum(
        c["degraded_in"] for c in lite["classes"].values()
    )
    events = work["degrade_transitions"]
    assert events[0]["event"] == "degraded" and 10 <= events[0]["t_s"] < 30
    # It ends on its own once the burst is over (hysteresis: recover_after_s of calm).
    assert events[-1]["event"] == "recovered" and events[-1]["t_s"] >= 30
    assert 0 < work["degraded_s"] < 60
    # The degraded tasks ran on the fallback and completed there.
    assert lite["goodput"] > 0 and r["pools"]["lite"]["completed"] == sum(
        c["completed"] for c in lite["classes"].values()
    )
    assert r["lost"] == 0
    # Same seed, same report.
    assert simulate(parse_scenario(_degrading()))["pools"] == r["pools"]


def test_bench_simulated_side_at_five_times_capacity():
    """The overload benchmark's simulated level (its spec, size and shares)."""
    on = simulate_level(5, 500.0, 15.0, admission=True)
    off = simulate_level(5, 500.0, 15.0, admission=False)
    assert on["lost"] == off["lost"] == 0
    assert on["classes"]["high"]["shed_share"] == 0.0
    assert on["classes"]["low"]["shed_share"] > 0.75
    assert on["goodput_share"] > 0.9 > off["goodput_share"] + 0.2


def test_flash_sale_scenario_loads_with_its_class_targets():
    sc = load_scenario(SCENARIOS / "flash-sale.yaml")
    assert sc.targets.pools["checkout"].classes["high"].max_shed_share == 0.0
    stream = sc.workload[0]
    assert stream.deadline_s == 2.0 and stream.priorities == {8: 0.1, 5: 0.3, 2: 0.6}


def test_bad_overload_input_names_the_field():
    data = _overloaded(True)
    data["workload"][0]["priorities"] = {12: 1}
    with pytest.raises(ScenarioError, match=r"workload\.0\.priorities"):
        parse_scenario(data)
    data = _overloaded(True, deadline_s=0)
    with pytest.raises(ScenarioError, match=r"workload\.0\.deadline_s"):
        parse_scenario(data)
    data = _overloaded(True)
    data["targets"] = {"pools": {"work": {"classes": {"urgent": {"p99_latency_s": 1}}}}}
    with pytest.raises(ScenarioError, match=r"targets\.pools\.work\.classes\.urgent"):
        parse_scenario(data)


def _flooded(bulkheads: bool) -> dict:
    """Ten agents of 0.1 s (100 tasks/s): tenant ``victim`` sends 20/s, ``flood`` 400/s;
    with bulkheads the flood may hold 50 queued and 5 in flight."""
    data = scenario_dict(
        pools=[_pinned("work")],
        models={"work": {"service": {"kind": "constant", "value_s": 0.1}}},
        workload=[
            {
                "pool": "work",
                "tenants": {name: 1},
                "arrivals": {"kind": "poisson", "rate_per_s": rate},
            }
            for name, rate in (("victim", 20), ("flood", 400))
        ],
        max_tasks=None,
        duration_s=20,
        drain_timeout_s=600,
    )
    if bulkheads:
        data["fleet"]["bulkheads"] = {
            "tenants": {"flood": {"max_queued": 50, "max_in_flight": 5}}
        }
    return data


def test_a_tenants_flood_stays_inside_its_bulkhead():
    r = simulate(parse_scenario(_flooded(True)))
    o = r["pools"]["work"]["overload"]
    bh = o["bulkheads"]
    # The flood is refused at its queued limit and never runs more than 5 at once; the
    # victim is never refused and waits for nobody: its latency is its service time.
    assert bh["refused_by_tenant"].keys() == {"flood"}
    assert bh["refused_by_tenant"]["flood"] > 5000
    assert bh["peak_in_flight_by_tenant"]["flood"] == 5
    assert bh["held_back_total"] > 0
    victim = r["tenants"]["work"]["victim"]
    assert victim["completed"] == victim["submitted"] > 300
    assert victim["mean_latency_s"] < 0.15
    refused = [c["refused"] for c in o["classes"].values()]
    assert refused == [{"bulkhead": bh["refused_by_tenant"]["flood"]}]
    assert r["lost"] == 0 and r["drained"]
    # Without the bulkhead the victim's tasks queue behind the flood.
    off = simulate(parse_scenario(_flooded(False)))
    assert off["tenants"]["work"]["victim"]["mean_latency_s"] > 10 * victim["mean_latency_s"]


@pytest.mark.slow
def test_the_flash_sale_meets_its_targets_and_degrades_during_the_sale():
    """The shipped scenario at full size (about 720,000 arrivals: seconds of CPU)."""
    r = simulate(load_scenario(SCENARIOS / "flash-sale.yaml"))
    assert r["targets_met"], r["targets"]
    checkout = r["pools"]["checkout"]["overload"]
    assert checkout["classes"]["high"]["shed_share"] == 0.0
    assert checkout["classes"]["low"]["shed_share"] > 0.5
    assert 0 < checkout["degraded_share"] < 0.5
    events = checkout["degrade_transitions"]
    assert events[0]["event"] == "degraded" and 60 <= events[0]["t_s"] < 120
    assert events[-1]["event"] == "recovered"
    assert r["lost"] == 0 and r["drained"]


def test_a_failed_task_is_retried_only_if_its_retry_can_start_before_its_deadline():
    """Deadlines reach the host core's retry decision (``decide_retry(time_left_s)``),
    as live: with 1 s backoffs and 0.5 s deadlines no failure is retried."""

    def run(deadline_s: float | None) -> dict:
        stream = {"deadline_s": deadline_s} if deadline_s else {}
        data = scenario_dict(
            models={
                "work": {
                    "service": {"kind": "constant", "value_s": 0.05},
                    "failures": {"task_failure_prob": 0.3},
                }
            },
            workload=[
                {"pool": "work", "arrivals": {"kind": "poisson", "rate_per_s": 20}, **stream}
            ],
            fleet={
                "resilience": {
                    "retry": {
                        "initial_backoff_s": 1.0,
                        "max_backoff_s": 1.0,
                        "jitter_ratio": 0,
                        "budget_ratio": 1.0,
                    }
                }
            },
        )
        return simulate(parse_scenario(data))

    late = run(0.5)
    assert late["failed_by_reason"].keys() == {"deadline"}
    assert 200 < late["failed_by_reason"]["deadline"] < 400  # 30% of 1,000, no retries
    free = run(None)
    assert "deadline" not in free["failed_by_reason"]
    assert free["failed"] < late["failed"] / 5  # retried, most of them succeed
    assert late["lost"] == free["lost"] == 0


def test_the_human_summary_has_a_pools_overload_line():
    from fleet.cli.simulate import _human

    r = simulate(parse_scenario(_overloaded(True, deadline_s=2.0)))
    c = r["pools"]["work"]["overload"]["classes"]
    line = next(ln for ln in _human(r).splitlines() if "overload:" in ln)
    assert f"offered {r['pools']['work']['overload']['offered']}" in line
    assert f"low {c['low']['shed_share']:.0%}/0%" in line and "high 0%/0%" in line
