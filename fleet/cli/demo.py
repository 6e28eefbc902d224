"""``fleet demo``: a mixed workload through three pools on a local Ray cluster."""

from __future__ import annotations

import argparse
import random
import time
from importlib import resources
from typing import Any

from fleet.cli.common import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    add_cluster_args,
    emit,
    load_spec_or_exit,
    progress_printer,
)
from fleet.spec import FleetSpec

MIX = (("support", 0.4), ("checkout", 0.4), ("analytics", 0.2))
SCALE_DOWN_WAIT_S = 45.0
FIRST_TICK_WAIT_S = 10.0


def demo_spec_path() -> str:
    return str(resources.files("fleet") / "examples" / "demo.yaml")


def make_tasks(n: int, rng: random.Random) -> list[dict[str, Any]]:
    caps = [c for c, _ in MIX]
    weights = [w for _, w in MIX]
    tasks = []
    for _ in range(n):
        cap = rng.choices(caps, weights)[0]
        if cap == "support":
            payload = {"question": f"Where is order #{rng.randrange(10**6)}?"}
        elif cap == "checkout":
            payload = {
                "items": [
                    {"price": round(rng.uniform(1, 200), 2), "qty": rng.randint(1, 3)}
                    for _ in range(rng.randint(1, 4))
                ]
            }
        else:
            payload = {"values": [rng.random() for _ in range(50)]}
        tasks.append(
            {
                "capability": cap,
                "payload": payload,
                "priority": rng.randint(0, 9),
                "affinity_key": f"customer-{rng.randrange(1000)}",
            }
        )
    return tasks


def agents_series(timeline: list[dict[str, Any]], pools: int) -> list[int]:
    """Total logical agents at each control tick (one sample per pool per tick)."""
    return [
        sum(s["agents"] for s in timeline[k : k + pools])
        for k in range(0, len(timeline) - pools + 1, pools)
    ]


def run_workload(spec: FleetSpec, n: int, seed: int, show: bool) -> dict[str, Any]:
    """Start the fleet, pour ``n`` tasks in, wait for every outcome and for scale-down."""
    from fleet.runtime.client import FleetClient

    fc = FleetClient.start(spec)
    try:
        tasks = make_tasks(n, random.Random(seed))
        # The series starts with the idle fleet: wait for the controller's first tick
        # (a tick that sees the queue already deep would start above the floor).
        deadline = time.monotonic() + FIRST_TICK_WAIT_S
        while not fc.timeline() and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        report = fc.submit(tasks)
        ids = report.accepted
        missing = fc.wait(ids, timeout_s=600, progress=progress_printer("tasks", show))
        t1 = time.time()
        summary = fc.summary(ids)
        # Keep the control loop running until every pool is back at its minimum.
        floor = sum(p.autoscaling.min_agents for p in spec.pools)
        deadline = time.monotonic() + SCALE_DOWN_WAIT_S
        while (
            time.monotonic() < deadline
            and sum(fc.status()["pools"][p.name]["agents"] for p in spec.pools) > floor
        ):
            time.sleep(0.5)
        series = agents_series(fc.timeline(), len(spec.pools))
        end = time.time()
    finally:
        fc.shutdown()
    return {
        "submitted": len(ids),
        "rejected": len(report.rejected),
        "completed": summary["completed"],
        "failed": summary["failed"],
        "lost": len(missing),
        "ledger_lost": summary["lost"],
        "failure_reasons": summary["failure_reasons"],
        "sample_errors": summary["sample_errors"],
        "duplicate_executions": summary["duplicate_executions"],
        "throughput_tasks_per_s": round(len(ids) / max(t1 - t0, 1e-9), 1),
        "latency_s": {k: round(v, 4) for k, v in summary["latency_s"].items()},
        "agents": {
            "min": min(series, default=0),
            "max": max(series, default=0),
            "start": series[0] if series else 0,
            "end": series[-1] if series else 0,
        },
        "pools": [p.name for p in spec.pools],
        "cost_usd": summary["cost_usd"],
        "tokens": summary["input_tokens"] + summary["output_tokens"],
        "wall_s": round(end - t0, 2),
    }


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray

    spec = load_spec_or_exit(args.spec or demo_spec_path())
    started = init_ray(args.address, log_format=spec.observability.log_format)
    try:
        result = run_workload(spec, args.tasks, args.seed, show=not args.quiet)
    finally:
        if started:
            import ray

            ray.shutdown()
    emit(args, result, _human)
    return EXIT_OK if result["lost"] == 0 else EXIT_INCOMPLETE


def _human(result: dict[str, Any]) -> str:
    return "\n".join(f"{k:>24}: {v}" for k, v in result.items())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a mixed workload through three pools and report",
        description="Start the demo fleet (support, checkout and analytics "
        "pools), submit TASKS tasks, wait for every outcome, and "
        "report throughput, latency, failures and autoscaling.",
    )
    add_cluster_args(p)
    p.add_argument("--tasks", type=int, default=20_000, help="tasks to submit (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--spec", default=None, help="fleet spec to use (default: the demo spec)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
