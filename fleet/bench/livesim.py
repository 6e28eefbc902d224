"""Live versus simulated: one small spec, the same arrivals, run both ways.

The live side runs on a local Ray cluster with sleeping agents (constant service time);
the simulated side runs ``fleet.sim.simulate_fleet`` with the same spec, rate, duration
and service time. Both report throughput, latency and logical agents over time. The
expected differences are listed in fleet/sim/README.md ("Simulated versus live").
"""

from __future__ import annotations

import random
import time
from typing import Any

from fleet.spec import parse_spec

SERVICE_S = 0.05
RATE_PER_S = 300.0
DURATION_S = 20.0


def livesim_spec():
    return parse_spec(
        {
            "name": "livesim",
            "namespace": "fleet-livesim",
            "queues": {"storage": {"backend": "memory"}},  # compared with the simulator
            "pools": [
                {
                    "name": "work",
                    "capability": "work",
                    "agent_class": "fleet.agents.testing:SleepAgent",
                    "agent_kwargs": {"delay_s": SERVICE_S},
                    "agents_per_host": 50,
                    "cpus_per_host": 0,
                    "autoscaling": {
                        "min_agents": 2,
                        "max_agents": 40,
                        "target_queued_per_agent": 2,
                        "control_interval_s": 0.25,
                        "upscale_within_s": 2,
                        "downscale_within_s": 4,
                        "downscale_stabilization_s": 1,
                    },
                }
            ],
        }
    )


def _series(samples: list[tuple[float, int]], step_s: float = 2.0) -> list[list[float]]:
    """Agents at every ``step_s`` (the last sample at or before each step)."""
    out, k = [], 0
    t = 0.0
    end = samples[-1][0] if samples else 0.0
    while t <= end:
        while k + 1 < len(samples) and samples[k + 1][0] <= t:
            k += 1
        out.append([round(t, 1), samples[k][1]])
        t += step_s
    return out


def run_live(rate: float, duration_s: float, seed: int) -> dict[str, Any]:
    from fleet.runtime.client import FleetClient

    fc = FleetClient.start(livesim_spec())
    try:
        rng = random.Random(seed)
        t0 = time.monotonic()
        t_next, ids = 0.0, []
        while t_next < duration_s:  # Poisson arrivals, submitted on time
            t_next += rng.expovariate(rate)
            delay = t0 + t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids += fc.submit([{"capability": "work"}]).accepted
        missing = fc.wait(ids, timeout_s=120)
        s = fc.summary(ids)
        tl = fc.timeline()
    finally:
        fc.shutdown()
    t_start = next((x["t_s"] for x in tl if x["unix_s"] >= s["first_submit_unix_s"]), 0.0)
    agents = [(x["t_s"] - t_start, x["agents"]) for x in tl if x["t_s"] >= t_start]
    span = s["last_finish_unix_s"] - s["first_submit_unix_s"]
    return {
        "submitted": len(ids),
        "lost": len(missing),
        "completed": s["completed"],
        "throughput_tasks_per_s": round(len(ids) / span, 1) if span > 0 else 0.0,
        "latency_s": {k: round(v, 4) for k, v in s["latency_s"].items()},
        "agents_max": max((a for _, a in agents), default=0),
        "agents_over_time": _series(agents),
    }


def run_sim(rate: float, duration_s: float, seed: int) -> dict[str, Any]:
    from fleet.sim import simulate_fleet

    r = simulate_fleet(
        livesim_spec(),
        rate,
        duration_s,
        seed=seed,
        sample_interval_s=0.25,
        service={"work": {"service": {"kind": "constant", "value_s": SERVICE_S}}},
    )
    series = r["agents_over_time"]["work"]
    agents = list(zip(series["t_s"], series["agents"]))
    return {
        "submitted": r["submitted"],
        "lost": r["lost"],
        "completed": r["completed"],
        "throughput_tasks_per_s": round(r["throughput_tasks_per_s"], 1),
        "latency_s": {k: round(v, 4) for k, v in r["latency_s"].items()},
        "agents_max": max((a for _, a in agents), default=0),
        "agents_over_time": _series(agents),
    }


def run(quick: bool = False) -> dict[str, Any]:
    duration = 8.0 if quick else DURATION_S
    live = run_live(RATE_PER_S, duration, seed=1)
    sim = run_sim(RATE_PER_S, duration, seed=1)
    return {
        "rate_per_s": RATE_PER_S,
        "duration_s": duration,
        "service_s": SERVICE_S,
        "live": live,
        "simulated": sim,
        "difference": {
            "throughput_ratio_live_over_sim": round(
                live["throughput_tasks_per_s"] / max(sim["throughput_tasks_per_s"], 1e-9), 3
            ),
            "p95_live_minus_sim_s": round(
                live["latency_s"]["p95"] - sim["latency_s"]["p95"], 4
            ),
            "agents_max_live_minus_sim": live["agents_max"] - sim["agents_max"],
        },
        "lost": live["lost"] + sim["lost"],
    }
