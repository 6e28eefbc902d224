"""``fleet chaos``: the chaos benchmark, or a chaos plan against a running fleet.

Exit status: 0 when nothing was lost or recorded twice, 1 when something was, 2 for bad
options, 3 when the cluster or the fleet cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from fleet.cli.common import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    CliError,
    add_cluster_args,
    progress_printer,
    resolve_fleet,
)

DEFAULT_TASKS = 100_000


def _attack(args: argparse.Namespace) -> dict[str, Any]:
    """Run the bench plan's injections against the running fleet ``args.fleet``."""
    from fleet.bench.chaos import bench_plan
    from fleet.chaos import ChaosHarness
    from fleet.runtime.client import FleetClient

    ref = resolve_fleet(args)
    fc = FleetClient.connect(ref.name, ref.namespace)
    plan = bench_plan(args.quick, args.seed).model_copy(
        update={"pool": args.pool or fc.spec.pools[0].name, "duration_s": args.duration_s}
    )
    report = ChaosHarness(fc, plan).run_for(plan.duration_s)
    report.pop("held_tasks", None)
    return report


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray

    if args.tasks < 1:
        raise CliError(f"--tasks must be at least 1, got {args.tasks}")
    # Ray prints some warnings on stdout; keep stdout for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        # A running fleet is on a running cluster: join it ("auto"), never start one.
        started = init_ray(args.address or ("auto" if args.fleet else None))
        try:
            if args.fleet:
                result = _attack(args)
            else:
                from fleet.bench.chaos import QUICK_TASKS
                from fleet.bench.chaos import run as bench

                n = (
                    args.tasks
                    if args.tasks_given
                    else (QUICK_TASKS if args.quick else DEFAULT_TASKS)
                )
                result = bench(
                    args.quick, n, args.seed, progress_printer("tasks", not args.quiet)
                )
        finally:
            if started:
                import ray

                ray.shutdown()
    if not args.json and not args.fleet:
        result = {k: v for k, v in result.items() if k != "injections"}
    print(json.dumps(result, sort_keys=True) if args.json else json.dumps(result, indent=2))
    ok = result.get("lost", 0) == 0 and result.get("recorded_twice", 0) == 0
    return EXIT_OK if ok else EXIT_INCOMPLETE


class _Tasks(argparse.Action):
    def __call__(
        self, parser: Any, ns: argparse.Namespace, value: Any, opt: Any = None
    ) -> None:
        ns.tasks = value
        ns.tasks_given = True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chaos",
        help="attack a fleet on purpose and prove nothing is lost",
        description="Without --fleet: start a chaos benchmark fleet (10 hosts of 10 no-op "
        "agents) on a local cluster (or --address), run TASKS tasks while "
        "killing 10%% of the hosts every few seconds, hanging an agent, "
        "injecting latency, partitioning the pool and burning CPU, and report "
        "injections, lost, duplicate_executions, recorded_twice, "
        "kill-to-replacement times and max_recovery_s. With --fleet: run the "
        "same injections against that running fleet for --duration-s seconds "
        "and print the injection log. " + __doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    add_cluster_args(p)
    p.add_argument(
        "--tasks",
        type=int,
        default=DEFAULT_TASKS,
        action=_Tasks,
        help=f"tasks to run (default {DEFAULT_TASKS}; 20000 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run")
    p.add_argument("--seed", type=int, default=6, help="chaos schedule seed (default 6)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--fleet",
        default=None,
        help="attack this running fleet instead of running the benchmark (on the "
        "cluster at --address, default auto)",
    )
    p.add_argument(
        "--namespace",
        default=None,
        help="its namespace (default: that of the one running fleet named --fleet)",
    )
    p.add_argument("--pool", default=None, help="pool to attack (default: the first)")
    p.add_argument(
        "--duration-s",
        type=float,
        default=30.0,
        help="how long to attack a running fleet (default 30)",
    )
    p.set_defaults(func=run, tasks_given=False)
