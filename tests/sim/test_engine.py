"""The simulation engine: accounting under chaos, autoscaling, drain, hooks, determinism."""

from __future__ import annotations

import math

import pytest

from fleet.sim import Component, Simulation, parse_scenario, report_json, simulate
from fleet.sim.components import STOPPED
from fleet.sim.report import check_autoscaler, jain

from .helpers import pool_spec, scenario, scenario_dict

SPIKE_SCALING = {
    "min_agents": 2,
    "max_agents": 60,
    "target_queued_per_agent": 1.0,
    "control_interval_s": 1.0,
    "upscale_within_s": 10,
    "downscale_within_s": 30,
    "downscale_stabilization_s": 5,
}


def chaos_scenario(seed: int = 3, **kw) -> dict:
    """Two pools, autoscaling through a spike, local queues and multi-slot agents, and
    every kind of trouble: kill waves, crashes, a partition, slowdowns, task failures."""
    data = scenario_dict(
        pools=[
            pool_spec("front", autoscaling=SPIKE_SCALING, concurrency_per_agent=2),
            pool_spec("back", 5, routing={"router": "round_robin"}),
        ],
        models={
            "front": {
                "service": {"kind": "lognormal", "median_s": 0.5, "sigma": 0.8},
                "startup": {"kind": "uniform", "low_s": 1, "high_s": 3},
                "agent_queue_limit": 3,
                "heterogeneity": {"slow_share": 0.2, "slowdown": 3},
                "failures": {
                    "task_failure_prob": 0.02,
                    "crash_rate_per_agent_per_h": 60,
                    "restart_delay_s": 2,
                },
            },
            "back": {
                "service": {"kind": "gamma", "mean_s": 0.4, "cv": 0.5},
                "failures": {"restart_delay_s": 1},
            },
        },
        workload=[
            {
                "pool": "front",
                "tenants": {"a": 2, "b": 1},
                "arrivals": {
                    "kind": "poisson",
                    "rate_per_s": 10,
                    "bursts": [
                        {"start_s": 30, "duration_s": 40, "multiplier": 6, "ramp_s": 5}
                    ],
                },
            },
            {"pool": "back", "arrivals": {"kind": "poisson", "rate_per_s": 5}},
        ],
        chaos={
            "kills": [{"share": 0.6, "waves": 6, "start_s": 10, "end_s": 100}],
            "partitions": [{"pool": "back", "start_s": 40, "duration_s": 10}],
            "slowdowns": [
                {"pool": "front", "share": 0.5, "factor": 4, "start_s": 50, "duration_s": 20}
            ],
        },
        duration_s=120,
        max_tasks=None,
        seed=seed,
        sample_interval_s=1.0,
        **kw,
    )
    data.pop("max_tasks")
    return data


def test_nothing_is_lost_under_chaos():
    sim = Simulation(parse_scenario(chaos_scenario())).run()
    r = sim.report()
    assert r["submitted"] > 1500
    assert r["lost"] == 0 and r["in_system_at_end"] == 0 and r["recorded_twice"] == 0
    assert r["completed"] + r["failed"] == r["submitted"]
    assert sim.outcome.count(0) == 0
    front = r["pools"]["front"]
    assert front["kills"] > 0 and front["crashes"] > 0 and front["restarts"] > 0
    assert front["requeued"] > 0  # killed agents' work went back to the queue
    # Failed executions were retried by fleet's retry policy (any out of attempts or
    # budget would be recorded as failed with its verdict).
    assert front["retries"]["retried"] > 0
    assert set(r["failed_by_reason"]) <= {
        "error",
        "timeout",
        "max_attempts",
        "retry_budget_exhausted",
        "max_deliveries",
    }
    assert {i["kind"] for i in r["chaos"]["injections"]} == {"kill", "partition", "slowdown"}
    assert r["drained"] is True
    # Killed agents come back, after fleet's restart backoff (which grows for an agent
    # that keeps dying) on top of restart_delay_s and the start-up time.
    assert front["replacement_s"]["n"] > 0 and front["replacement_s"]["max"] >= 2
    assert r["components"]["health"]["restart_backoff_s"]["n"] > 0


def test_replacement_takes_restart_delay_plus_start_up_without_health_policy():
    sim = Simulation(parse_scenario(chaos_scenario()), default_components=False).run()
    rep = sim.pool_by_name["front"].replacements
    assert rep and 2 <= min(rep) and max(rep) <= 5 + 1e-9  # 2 s delay + 1..3 s start-up


def test_cascade_guard_throttles_mass_restarts():
    # A third of a 60-agent pool is killed at once: more than cascade_share (10%) of
    # the fleet is down, so the guard opens (an alert) and lets 5 restarts per 10 s
    # through; the fleet recovers and the guard closes again. Nothing is lost.
    data = scenario_dict(
        pools=[pool_spec("p", 60)],
        models={
            "p": {
                "service": {"kind": "exponential", "mean_s": 1.0},
                "failures": {"restart_delay_s": 1.0},
            }
        },
        workload=[{"pool": "p", "arrivals": {"kind": "poisson", "rate_per_s": 30}}],
        chaos={"kills": [{"pool": "p", "share": 0.34, "start_s": 50}]},
        duration_s=300,
        max_tasks=None,
        sample_interval_s=1.0,
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data)).run()
    r = sim.report()
    health = r["components"]["health"]
    assert health["cascade"]["opened"] == 1
    assert health["events"]["alert_firing"] == 1 and health["events"]["alert_resolved"] == 1
    assert health["restarts_refused"] > 0
    assert health["cascade"]["state"] == "closed"
    p = sim.pools[0]
    # At most 5 restarts began in any 10 s while the guard was open: 20 agents took
    # at least 30 s to come back.
    assert max(p.replacements) >= 30
    assert len(p.replacements) == 20
    assert r["lost"] == 0


def test_same_seed_same_bytes_and_other_seed_differs():
    a = report_json(simulate(parse_scenario(chaos_scenario(seed=9))), timing=False)
    b = report_json(simulate(parse_scenario(chaos_scenario(seed=9))), timing=False)
    c = report_json(simulate(parse_scenario(chaos_scenario(seed=10))), timing=False)
    assert a == b
    assert a != c
    assert '"wall_s"' not in a


def test_autoscaler_stays_within_bounds_and_rates():
    sim = Simulation(parse_scenario(chaos_scenario())).run()
    front = sim.pool_by_name["front"]
    check = check_autoscaler(front)
    assert check["ok"], check["problems"]
    assert check["target_max"] == 60 and check["target_min"] == 2  # it went all the way
    # Independently of the checker: steps of at most (60 - 2) / 10 s x 1 s = 5.8 agents
    # up and (60 - 2) / 30 s = 1.93 down, plus the one agent of carried credit, every
    # decision within the bounds.
    steps = [b - a for a, b in zip([2, *front.c_target], front.c_target)]
    assert max(steps) <= 6 and min(steps) >= -2
    assert all(2 <= n <= 60 for n in front.c_target)
    assert max(s + st for s, st in zip(front.s_serving, front.s_starting)) <= 60


def test_autoscaler_check_catches_violations():
    sim = Simulation(parse_scenario(chaos_scenario())).run()
    front = sim.pool_by_name["front"]
    i = front.c_target.index(max(front.c_target))
    front.c_target[i : i + 1] = [front.c_target[i] + 30]  # a jump no rate allows, over max
    check = check_autoscaler(front)
    assert not check["ok"]
    text = " ".join(check["problems"])
    assert "outside [2, 60]" in text and "exceeds" in text


def test_scale_down_drains_gracefully():
    # No kills or crashes: any task that went back to the queue would be a drain bug.
    data = scenario_dict(
        pools=[
            pool_spec(
                "p",
                autoscaling={
                    **SPIKE_SCALING,
                    "downscale_within_s": 5,
                    "downscale_stabilization_s": 0,
                },
            )
        ],
        models={"p": {"service": {"kind": "constant", "value_s": 3.0}}},
        workload=[
            {
                "pool": "p",
                "arrivals": {
                    "kind": "poisson",
                    "rate_per_s": 2,
                    "bursts": [{"start_s": 10, "duration_s": 20, "multiplier": 10}],
                },
            }
        ],
        duration_s=80,
        max_tasks=None,
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data)).run()
    p = sim.pools[0]
    assert max(p.c_target) > 20 and p.c_target[-1] < 10  # it scaled up and back down
    assert p.requeued == 0
    assert sim.outcome.count(0) == 0
    # Every execution took its full service time: drained agents finished their task.
    assert p.busy_s == pytest.approx(3.0 * len(p.lat))


def test_new_agents_serve_only_after_their_start_up_time():
    data = scenario_dict(
        pools=[pool_spec("p", autoscaling=SPIKE_SCALING)],
        models={
            "p": {
                "service": {"kind": "constant", "value_s": 1.0},
                "startup": {"kind": "constant", "value_s": 7.0},
            }
        },
        workload=[
            {
                "pool": "p",
                "arrivals": {
                    "kind": "poisson",
                    "rate_per_s": 1,
                    "bursts": [{"start_s": 20, "duration_s": 20, "multiplier": 20}],
                },
            }
        ],
        duration_s=60,
        max_tasks=None,
        sample_interval_s=0.5,
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data)).run()
    p = sim.pools[0]
    first_up = next(t for t, n in zip(p.c_t, p.c_target) if n > 2)
    first_more = next(t for t, n in zip(p.s_t, p.s_serving) if n > 2)
    assert 7.0 <= first_more - first_up <= 7.5


def test_agent_failing_too_often_is_retired_and_replaced():
    # Health policy: after 2 consecutive failures an agent is not restarted; the
    # autoscaler's next decision starts a fresh agent in its place.
    data = scenario_dict(
        pools=[
            pool_spec(
                "p", autoscaling={"min_agents": 2, "max_agents": 2, "control_interval_s": 1.0}
            )
        ],
        fleet={"health": {"restart": {"eject_after_failures": 2, "initial_backoff_s": 0.5}}},
        models={
            "p": {
                "service": {"kind": "constant", "value_s": 0.5},
                "failures": {"restart_delay_s": 0.5},
            }
        },
        workload=[{"pool": "p", "arrivals": {"kind": "poisson", "rate_per_s": 1}}],
        chaos={
            "kills": [{"pool": "p", "share": 1.0, "waves": 6, "start_s": 10, "end_s": 100}]
        },
        duration_s=150,
        max_tasks=None,
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data)).run()
    r = sim.report()
    assert r["components"]["health"]["retired"] > 0
    assert r["events_by_kind"]["retire"] == r["components"]["health"]["retired"]
    assert sim.pools[0].n_created > 2  # replacements for the retired agents
    assert sim.pools[0].serving == 2
    assert r["lost"] == 0


def test_max_deliveries_fails_a_task_instead_of_losing_it():
    # One agent, killed every few seconds while it works on a 10-second task.
    data = scenario_dict(
        pools=[pool_spec("p", 1)],
        fleet={"resilience": {"max_deliveries": 2}},
        models={
            "p": {
                "service": {"kind": "constant", "value_s": 10.0},
                "failures": {"restart_delay_s": 0.5},
            }
        },
        workload=[{"pool": "p", "arrivals": {"kind": "trace", "path": "unused"}}],
    )
    data["workload"][0]["arrivals"] = {"kind": "poisson", "rate_per_s": 0.05}
    data["max_tasks"] = 3
    data["chaos"] = {"kills": [{"share": 1.0, "waves": 40, "start_s": 1, "end_s": 200}]}
    r = simulate(parse_scenario(data), default_components=False)
    assert r["lost"] == 0
    assert r["failed_by_reason"].get("max_deliveries", 0) >= 1


def test_task_timeout_fails_the_task_and_frees_the_agent():
    r = simulate(
        scenario(
            fleet={"resilience": {"task_timeout_s": 2.0, "retry": {"max_attempts": 1}}},
            models={"work": {"service": {"kind": "constant", "value_s": 10.0}}},
            max_tasks=20,
        )
    )
    assert r["failed_by_reason"] == {"timeout": 20}
    assert r["pools"]["work"]["utilization"] > 0
    assert r["latency_s"]["p50"] >= 2.0


def test_failures_are_retried_by_the_fleet_retry_policy():
    # 30% of executions fail; 3 attempts with a generous budget: ~2.7% fail for good.
    retry = {"max_attempts": 3, "budget_ratio": 1.0, "initial_backoff_s": 0.5}
    data = scenario_dict(
        fleet={"resilience": {"retry": retry}},
        models={
            "work": {
                "service": {"kind": "exponential", "mean_s": 0.5},
                "failures": {"task_failure_prob": 0.3},
            }
        },
        max_tasks=3000,
    )
    r = simulate(parse_scenario(data))
    work = r["pools"]["work"]
    assert r["lost"] == 0
    assert r["failed_by_reason"] == {"max_attempts": r["failed"]}
    assert 0.015 < r["failed"] / 3000 < 0.04
    assert work["retries"]["retried"] > 0.3 * 3000
    # A non-retryable error is recorded at once.
    data["pools"]["work"]["failures"]["error"] = "ValueError: bad cart"
    r = simulate(parse_scenario(data))
    assert r["pools"]["work"]["retries"]["retried"] == 0
    assert r["failed_by_reason"] == {"error": r["failed"]}


def test_breakers_eject_bad_agents_within_the_cap():
    # A tenth of the agents is 20x slower: with a slow-call threshold the breakers eject
    # them, never more than the 10% cap at once, and readmit them to probe.
    breaker = {
        "min_calls": 5,
        "window_calls": 10,
        "slow_call_duration_s": 5.0,
        "slow_call_rate_threshold": 0.5,
        "open_duration_s": 20.0,
    }
    data = scenario_dict(
        pools=[pool_spec("work", 40)],
        fleet={"resilience": {"agent_breaker": breaker}},
        models={
            "work": {
                "service": {"kind": "exponential", "mean_s": 1.0},
                "heterogeneity": {"slow_share": 0.1, "slowdown": 20},
            }
        },
        workload=[{"pool": "work", "arrivals": {"kind": "poisson", "rate_per_s": 20}}],
        max_tasks=20_000,
    )
    sim = Simulation(parse_scenario(data)).run()
    r = sim.report()
    b = r["pools"]["work"]["breakers"]
    assert b["events"].get("transition:open", 0) > 0
    assert b["events"].get("transition:half_open", 0) > 0  # probing after open_duration_s
    assert 1 <= b["ejected_max"] <= b["max_ejected_allowed"] == 4
    assert r["lost"] == 0
    data["fleet"]["resilience"]["agent_breaker"]["enabled"] = False
    r_off = simulate(parse_scenario(data))
    assert "breakers" not in r_off["pools"]["work"]
    assert r["latency_s"]["p99"] < r_off["latency_s"]["p99"]


def test_partition_holds_outcomes_until_it_heals():
    data = scenario_dict(
        pools=[pool_spec("p", 3)],
        models={"p": {"service": {"kind": "constant", "value_s": 0.5}}},
        workload=[{"pool": "p", "arrivals": {"kind": "poisson", "rate_per_s": 2}}],
        chaos={"partitions": [{"pool": "p", "start_s": 20, "duration_s": 10}]},
        duration_s=60,
        max_tasks=None,
        sample_interval_s=1.0,
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data)).run()
    p = sim.pools[0]
    # (The heal at t=30 delivers the held outcomes at once: the sample taken at 30 may
    # count them, so "during" ends before it.)
    during = [d for t, d in zip(p.s_t, p.s_done) if 21 < t < 30]
    after = [d for t, d in zip(p.s_t, p.s_done) if 30 <= t <= 40]
    assert sum(during) == 0  # nothing reached the ledger while cut off
    assert max(p.s_queue) > 10  # work waited in the queue meanwhile
    assert sum(after) >= 30  # and drained after the heal, faster than it arrives (2/s)
    assert max(p.lat) > 9.5  # a task finished just after 20 s was recorded at 30 s
    assert sim.outcome.count(0) == 0


def test_trace_arrivals_are_submitted_at_their_timestamps(tmp_path):
    (tmp_path / "t.txt").write_text("0.25\n1.5\n1.5\n4\n")
    data = scenario_dict(
        workload=[
            {"pool": "work", "arrivals": {"kind": "trace", "path": "t.txt", "time_scale": 2.0}}
        ]
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data, base_dir=tmp_path)).run()
    assert list(sim.submit_t) == [0.5, 3.0, 3.0, 8.0]


def test_bursts_and_diurnal_shape_the_arrival_rate():
    data = scenario_dict(
        models={"work": {"service": {"kind": "constant", "value_s": 0.0}}},
        workload=[
            {
                "pool": "work",
                "arrivals": {
                    "kind": "poisson",
                    "rate_per_s": 100,
                    "diurnal": {"amplitude": 0.5, "period_s": 400, "peak_s": 100},
                    "bursts": [{"start_s": 300, "duration_s": 50, "multiplier": 4}],
                },
            }
        ],
        duration_s=400,
        max_tasks=None,
    )
    data.pop("max_tasks")
    sim = Simulation(parse_scenario(data)).run()
    times = list(sim.submit_t)

    def count(a, b):
        return sum(1 for t in times if a <= t < b)

    # Expected counts: integrate 100 (1 + 0.5 cos(2 pi (t - 100) / 400)) (x4 in the burst).
    def expected(a, b):
        w = 2 * math.pi / 400
        return 100 * ((b - a) + 0.5 / w * (math.sin(w * (b - 100)) - math.sin(w * (a - 100))))

    for a, b, mult in [(50, 150, 1), (200, 300, 1), (300, 350, 4)]:
        e = expected(a, b) * mult
        assert abs(count(a, b) - e) < 5 * math.sqrt(e) + 0.02 * e, (a, b, count(a, b), e)


def test_costs_follow_tokens_and_agent_time():
    data = scenario_dict(
        fleet={
            "budgets": {
                "prices": {"m": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}}
            }
        },
        models={
            "work": {
                "service": {"kind": "constant", "value_s": 0.1},
                "agent_usd_per_hour": 3.6,
                "tokens": {
                    "model": "m",
                    "input_tokens": {"kind": "constant", "value": 1000},
                    "output_tokens": {"kind": "constant", "value": 500},
                },
            }
        },
        max_tasks=100,
    )
    r = simulate(parse_scenario(data))
    c = r["pools"]["work"]["cost"]
    assert c["input_tokens"] == 100_000 and c["output_tokens"] == 50_000
    assert c["tokens_usd"] == pytest.approx(100 * (1000 * 1 + 500 * 2) / 1e6)
    assert c["agents_usd"] == pytest.approx(4 * 0.001 * r["sim_time_s"], rel=1e-4)
    assert r["cost"]["usd_per_1000_tasks"] == pytest.approx(1000 * r["cost"]["usd"] / 100)


def test_jain_index():
    assert jain([1, 1, 1]) == 1.0
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([5]) is None


def test_tenants_share_a_pool_fairly_under_fifo():
    r = simulate(parse_scenario(chaos_scenario()))
    fair = r["fairness"]["per_pool"]["front"]
    assert fair["tenants_latency"] > 0.95
    assert set(r["tenants"]["front"]) == {"a", "b"}
    a, b = r["tenants"]["front"]["a"], r["tenants"]["front"]["b"]
    assert 1.6 < a["submitted"] / b["submitted"] < 2.4  # weights 2:1


class Breakerish(Component):
    """A test component: ejects an agent after its first failure, readmits it 5 s later,
    and restarts dead agents after 0.25 s."""

    name = "breakerish"

    def __init__(self) -> None:
        self.outcomes = 0
        self.ejected: list[tuple[float, str]] = []
        self.downs = 0
        self.ticks = 0

    def on_outcome(self, sim, agent, tid, ok, service_s, now_s):
        self.outcomes += 1
        if not ok and sim.eject(agent, now_s):
            self.ejected.append((now_s, agent.id))
            sim.schedule(now_s + 5.0, lambda t, a=agent: sim.readmit(a, t))

    def on_agent_down(self, sim, agent, reason, now_s):
        self.downs += 1

    def restart_delay_s(self, sim, agent, default_s, now_s):
        return 0.25

    def on_tick(self, sim, now_s):
        self.ticks += 1

    def report(self):
        return {"ejections": len(self.ejected)}


def test_components_plug_into_the_engine():
    comp = Breakerish()
    data = chaos_scenario()
    # The cascade guard off, so that the restart delay is the component's alone (the
    # chaos kills 60% of the pool: with the guard on, it throttles the restarts).
    data["fleet"]["health"] = {"cascade": {"enabled": False}}
    sim = Simulation(parse_scenario(data), components=[comp]).run()
    r = sim.report()
    executions = sum(len(p.lat) for p in sim.pools)
    assert comp.outcomes >= executions  # every execution is seen (and the partition's)
    assert comp.ejected and r["components"]["breakerish"]["ejections"] == len(comp.ejected)
    assert comp.downs == sum(p.kills + p.crashes for p in sim.pools)
    assert comp.ticks == len(sim.pools[0].s_t)
    assert r["lost"] == 0
    assert r["pools"]["front"]["replacement_s"]["max"] <= 0.25 + 3 + 1e-9
    # An agent held out is out of the host core's routing.
    for p in sim.pools:
        assert all(a.ridx < 0 for a in p.active if a.held)


def test_simulate_fleet_gives_the_simulated_side_of_a_live_comparison():
    from pathlib import Path

    from fleet.sim import simulate_fleet
    from fleet.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "fleet" / "examples" / "demo.yaml")
    out = simulate_fleet(
        spec, {"support": 50, "checkout": 50}, duration_s=20, seed=1, service={}
    )
    assert out["lost"] == 0
    assert out["submitted"] == out["completed"] + out["failed"]
    assert set(out["latency_s"]) == {"p50", "p95", "p99"}
    assert out["throughput_tasks_per_s"] > 50
    assert set(out["agents_over_time"]) == {"support", "checkout", "analytics"}
    with pytest.raises(ValueError, match="analytics"):
        simulate_fleet(spec, 10.0, duration_s=5)


def test_a_run_cut_by_the_drain_timeout_reports_what_is_still_in_flight():
    data = scenario_dict(
        models={"work": {"service": {"kind": "constant", "value_s": 50.0}}},
        max_tasks=40,
        drain_timeout_s=30,
    )
    r = simulate(parse_scenario(data))
    assert r["drained"] is False
    assert r["lost"] > 0
    assert r["in_system_at_end"] == r["lost"]  # every task without an outcome is accounted
    assert not r["targets_met"] and not r["targets"]["lost"]["met"]


class HostCount(Component):
    """Counts executions per host."""

    name = "host_count"

    def __init__(self) -> None:
        self.by_host: dict[str, int] = {}

    def on_outcome(self, sim, agent, tid, ok, service_s, now_s):
        self.by_host[agent.host.id] = self.by_host.get(agent.host.id, 0) + 1


def test_agents_live_in_hosts_of_agents_per_host_each_with_its_own_core():
    # 250 agents, 100 per host: three hosts (100, 100, 50 agents), as Serve would run
    # them. Each host has its own core: its own ejection cap (10% of its agents) and
    # its own routing; the host router spreads the work by load, so each host does a
    # share of the work in proportion to its agents.
    count = HostCount()
    data = scenario_dict(
        pools=[pool_spec("p", 250, agents_per_host=100)],
        models={"p": {"service": {"kind": "exponential", "mean_s": 1.0}}},
        workload=[{"pool": "p", "arrivals": {"kind": "poisson", "rate_per_s": 175}}],
        max_tasks=60_000,
    )
    sim = Simulation(parse_scenario(data), components=[count]).run()
    p = sim.pools[0]
    assert [h.live for h in p.hosts] == [100, 100, 50]
    assert [len(h.core.agents) for h in p.hosts] == [100, 100, 50]
    for h in p.hosts:
        assert all(a.host is h and a.id.startswith(f"{h.id}/") for a in h.core.agents)
        assert h.core.breakers.registry.snapshot()["max_ejected"] == (
            10 if h.live == 100 else 5
        )
    assert sim.report()["lost"] == 0
    total = sum(count.by_host.values())
    for h in p.hosts:
        share = count.by_host[h.id] / total
        assert share == pytest.approx(h.live / 250, rel=0.1), (h.id, share)


def test_new_hosts_open_only_when_every_host_is_full():
    # 100 agents, 50 per host: two full hosts. An agent drained from the first host
    # leaves room there, and the next new agent takes it instead of opening a third.
    sim = Simulation(
        scenario(pools=[pool_spec("p", 100, agents_per_host=50)], max_tasks=10)
    ).run()
    p = sim.pools[0]
    assert [h.live for h in p.hosts] == [50, 50] and p.open_hosts == []
    idle = next(a for a in p.hosts[0].core.agents if a.in_flight == 0)
    sim._drain(idle, sim.now)
    assert idle.state == STOPPED and p.open_hosts == [p.hosts[0]]
    new = sim._new_agent(p)
    assert new.host is p.hosts[0] and new.id == "p/h0/50"
    assert [h.live for h in p.hosts] == [50, 50] and p.open_hosts == []
    another = sim._new_agent(p)
    assert another.host is p.hosts[2] and len(p.hosts) == 3
