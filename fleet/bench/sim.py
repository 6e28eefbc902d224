"""Simulator benchmark: the Black Friday scenario, 1,000,000 tasks on up to 10,000 agents.

``run(quick=False)`` simulates ``examples/scenarios/black-friday.yaml`` as shipped and
returns its report with the figures the issue asks for at the top (``wall_s``,
``events_per_s``, ``tasks``, ``agents_max``, ``lost``, ``p99_s``). ``quick=True``
scales the scenario down twentyfold (rates, agent bounds and task cap), for a smoke run
of a few seconds. No Ray is needed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

NEEDS_RAY = False
QUICK_FACTOR = 0.05
SCENARIO = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "black-friday.yaml"


def _scaled(data: dict[str, Any], f: float) -> dict[str, Any]:
    """The scenario with its load and fleet scaled by ``f`` (same shape, same policies)."""
    data = dict(data)
    data["max_tasks"] = max(1, int(data["max_tasks"] * f))
    for st in data["workload"]:
        if st["arrivals"]["kind"] == "poisson":
            st["arrivals"]["rate_per_s"] *= f
    for pool in data["fleet"]["pools"]:
        a = pool["autoscaling"]
        for key in ("min_agents", "max_agents", "initial_agents"):
            if a.get(key) is not None:
                a[key] = max(1, int(a[key] * f))
    return data


def run(quick: bool = False) -> dict[str, Any]:
    import yaml

    from fleet.sim import Simulation, parse_scenario

    if not SCENARIO.exists():
        raise FileNotFoundError(
            f"benchmark scenario not found: {SCENARIO} (run from a source checkout)"
        )
    data = yaml.safe_load(SCENARIO.read_text())
    if quick:
        data = _scaled(data, QUICK_FACTOR)
    scenario = parse_scenario(data, str(SCENARIO), SCENARIO.parent)
    t0 = time.perf_counter()
    sim = Simulation(scenario).run()
    report = sim.report()
    total = time.perf_counter() - t0
    return {
        "scenario": str(SCENARIO.relative_to(SCENARIO.parents[2])),
        "quick": quick,
        "wall_s": report["wall_s"],
        "wall_with_report_s": round(total, 3),
        "events_per_s": report["events_per_s"],
        "tasks": report["tasks"],
        "agents_max": report["agents_max"],
        "lost": report["lost"],
        "p99_s": report["latency_s"]["p99"],
        "targets_met": report["targets_met"],
        "report": report,
    }
