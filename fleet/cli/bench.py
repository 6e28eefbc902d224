"""``fleet bench [SUITE]``: run a benchmark suite and print its figures.

Exit status: 0 when the run lost no task, 1 when it did, 2 for an option the suite does
not take, 3 when the cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys

from fleet.bench import SUITES
from fleet.cli.common import EXIT_INCOMPLETE, EXIT_OK, CliError, add_cluster_args


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray

    module = importlib.import_module(SUITES[args.suite])
    kwargs = {"quick": args.quick}
    if args.plot:
        if "plot" not in inspect.signature(module.run).parameters:
            raise CliError(f"suite {args.suite!r} draws no plot (--plot)")
        kwargs["plot"] = args.plot
    if args.admission:
        if "admission" not in inspect.signature(module.run).parameters:
            raise CliError(f"suite {args.suite!r} takes no --admission")
        kwargs["admission"] = True
    if args.tasks is not None:
        if "tasks" not in inspect.signature(module.run).parameters:
            raise CliError(f"suite {args.suite!r} takes no --tasks")
        kwargs["tasks"] = args.tasks
    # Ray prints some warnings on stdout; keep stdout for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        # Without Ray's dashboard (a UI process with work of its own on the cores being
        # measured); fleet's metrics are exported all the same, by Ray's metrics agent.
        started = (
            init_ray(args.address, dashboard=False)
            if getattr(module, "NEEDS_RAY", True)
            else False
        )
        try:
            result = module.run(**kwargs)
        finally:
            if started:
                import ray

                ray.shutdown()
    result = {"suite": args.suite, **result}
    print(json.dumps(result, sort_keys=True) if args.json else json.dumps(result, indent=2))
    return EXIT_OK if result.get("lost", 0) == 0 else EXIT_INCOMPLETE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (default: core)",
        description="Benchmarks print figures; they assert nothing. "
        + __doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    p.add_argument("suite", nargs="?", default="core", choices=sorted(SUITES))
    add_cluster_args(p)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="tasks (or outcomes) per run, for suites that take it "
        "(durability, ledger, recording)",
    )
    p.add_argument("--plot", default=None, help="write the suite's plot (PNG) to this path")
    p.add_argument(
        "--admission",
        action="store_true",
        help="with admission control on, for suites that take it (core: what it costs)",
    )
    p.set_defaults(func=run)
