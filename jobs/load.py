"""Load test a fleet from a Ray job; prints one JSON summary as its last line of output.

    ray job submit --working-dir . -- python jobs/load.py --tasks 20000
    ray job submit --working-dir . -- python jobs/load.py --fleet support \
        --namespace fleet-support --tasks 2000 --rate 500

With ``--spec`` (default: the demo fleet) the job loads the fleet of that spec: it joins
it if it runs on the cluster (deployed by ``serve run``/``serve deploy`` or
``fleet run --detach``), else starts it for the run and tears it down after. With
``--fleet``/``--namespace`` it only joins a running fleet. Tasks are the demo's mixed
workload when the fleet serves the demo's capabilities, else ``--payload`` sent round
robin to every capability. ``lost`` counts submitted ids without an outcome in the
ledger; the exit status is 1 if any task was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

PACE_TICK_S = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/load.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--spec",
        default="fleet/examples/demo.yaml",
        help="fleet spec to load (joined if running, else started for the run)",
    )
    p.add_argument("--fleet", default=None, help="join the running fleet of this name instead")
    p.add_argument("--namespace", default="fleet", help="namespace of --fleet (default fleet)")
    p.add_argument("--tasks", type=int, default=2_000, help="tasks to submit (default 2000)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="arrivals per second (default 0: submit everything at once)",
    )
    p.add_argument("--payload", default="{}", help="JSON payload for non-demo capabilities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeout-s", type=float, default=600.0, help="how long to wait for outcomes"
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster (default: RAY_ADDRESS, which `ray job submit` sets; "
        "without it, start a local cluster on 127.0.0.1)",
    )
    args = p.parse_args(argv)
    if args.tasks < 1:
        p.error(f"--tasks must be >= 1, got {args.tasks}")
    if args.rate < 0:
        p.error(f"--rate must be >= 0 tasks/s, got {args.rate}")
    try:
        args.payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        p.error(f"--payload is not JSON: {exc}")
    return args


def make_load(
    capabilities: list[str], n: int, seed: int, payload: Any
) -> list[dict[str, Any]]:
    """The demo's mixed workload if the fleet serves exactly its capabilities, else
    ``payload`` round robin over ``capabilities``."""
    from fleet.cli.demo import MIX, make_tasks

    rng = random.Random(seed)
    if sorted(capabilities) == sorted(c for c, _ in MIX):
        return make_tasks(n, rng)
    return [
        {"capability": capabilities[k % len(capabilities)], "payload": payload}
        for k in range(n)
    ]


def connect_or_start(args: argparse.Namespace) -> tuple[Any, bool]:
    """A FleetClient, and whether this job started the fleet (and must stop it)."""
    from fleet.runtime.client import FleetClient
    from fleet.serve_app import resolve_spec

    if args.fleet:
        return FleetClient.connect(args.fleet, args.namespace), False
    spec = resolve_spec(args.spec, "--spec")
    try:
        return FleetClient.connect(spec.name, spec.namespace), False
    except LookupError:
        return FleetClient.start(spec), True


def submit_paced(fc: Any, tasks: list[dict[str, Any]], rate: float) -> tuple[list[str], int]:
    """Submit at ``rate`` tasks/s (all at once if 0); returns accepted ids and rejects."""
    if rate <= 0:
        report = fc.submit(tasks)
        return report.accepted, len(report.rejected)
    ids, rejected = [], 0
    t0 = time.monotonic()
    sent = 0
    while sent < len(tasks):
        due = min(len(tasks), int((time.monotonic() - t0) * rate) + 1)
        if due > sent:
            report = fc.submit(tasks[sent:due])
            ids += report.accepted
            rejected += len(report.rejected)
            sent = due
        time.sleep(PACE_TICK_S)
    return ids, rejected


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fleet.runtime.client import init_ray

    # `ray job submit` sets RAY_ADDRESS; with neither, a local loopback cluster starts.
    started_ray = init_ray(args.address or os.environ.get("RAY_ADDRESS"))
    fc, started = connect_or_start(args)
    try:
        tasks = make_load(fc.spec.capabilities, args.tasks, args.seed, args.payload)
        t0 = time.time()
        ids, rejected = submit_paced(fc, tasks, args.rate)
        missing = fc.wait(ids, timeout_s=args.timeout_s)
        t1 = time.time()
        summary = fc.summary(ids)
    finally:
        if started:
            fc.shutdown()
        if started_ray:
            import ray

            ray.shutdown()
    return {
        "fleet": fc.spec.name,
        "namespace": fc.spec.namespace,
        "started_fleet": started,
        "submitted": len(ids),
        "rejected": rejected,
        "completed": summary["completed"],
        "failed": summary["failed"],
        "failure_reasons": summary["failure_reasons"],
        "lost": len(missing),
        "duplicate_executions": summary["duplicate_executions"],
        "throughput_tasks_per_s": round(len(ids) / max(t1 - t0, 1e-9), 1),
        "latency_s": {k: round(v, 4) for k, v in summary["latency_s"].items()},
        "cost_usd": summary["cost_usd"],
        "wall_s": round(t1 - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
