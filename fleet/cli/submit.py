"""``fleet submit FILE``: submit tasks (JSON lines) to a running fleet.

Exit status: 0 when every task was submitted (and, with ``--wait``, every one has an
outcome: completed or failed), 1 when ``--wait`` timed out with tasks still missing,
the queue stayed full, or admission control refused tasks (their ids are printed:
resubmit them; ``--retry-refused-s`` does so, throttled, after each Retry-After), 2 for
malformed lines, invalid tasks or an idempotency conflict (nothing submitted), 3 when
the cluster or the fleet cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys

from fleet.cli.common import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    JOINS_RUNNING_CLUSTER,
    MAX_PROBLEMS_SHOWN,
    CliError,
    add_cluster_args,
    add_fleet_args,
    progress_printer,
    resolve_fleet,
)
from fleet.task import IdempotencyConflict, TaskRejected, parse_task_json

SKIP_HINT = "--skip-invalid submits the valid ones"


def read_tasks(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """Parse JSON lines; a malformed line is reported with its number, not dropped."""
    tasks, bad = [], []
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with stream:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                tasks.append(parse_task_json(line, where=f"line {n}"))
            except TaskRejected as exc:
                bad.append((n, str(exc)))
    return tasks, bad


def _problems(what: str, msgs: list[str], hint: str) -> CliError:
    """One error line for many bad inputs: the count, then the first few."""
    shown = "; ".join(msgs[:MAX_PROBLEMS_SHOWN])
    more = (
        f"; and {len(msgs) - MAX_PROBLEMS_SHOWN} more"
        if len(msgs) > MAX_PROBLEMS_SHOWN
        else ""
    )
    return CliError(
        f"{len(msgs)} {what}, nothing submitted ({hint}): {shown}{more}", EXIT_USAGE
    )


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import FleetClient, init_ray

    tasks, bad = read_tasks(args.file)
    if bad and not args.skip_invalid:
        raise _problems("malformed line(s)", [msg for _, msg in bad], SKIP_HINT)
    init_ray(args.address or "auto")
    ref = resolve_fleet(args)
    fc = FleetClient.connect(ref.name, ref.namespace)
    items, report = fc.validate(tasks)
    if report.rejected and not args.skip_invalid:
        raise _problems(
            "invalid task(s)",
            [f"task {k + 1}: {msg}" for k, msg in report.rejected],
            SKIP_HINT,
        )
    try:
        fc.submit_validated(items, report)
        if report.refused and args.retry_refused_s > 0:
            fc.retry_refused(items, report, args.retry_refused_s)
    except IdempotencyConflict as exc:
        raise CliError(f"{exc}; nothing submitted", EXIT_USAGE) from exc
    existing = report.existing
    ids = report.accepted
    refused = report.refused
    # Tasks that already have an outcome were not run again; their outcome is the answer.
    out = {
        "fleet": ref.name,
        "namespace": ref.namespace,
        "submitted": len(ids),
        "rejected": len(report.rejected) + len(bad),
        "ids": ids,
        "already_recorded": len(existing),
        "refused": [  # "task": its number among the tasks read, as in errors ("task N")
            {
                "task": r.index + 1,
                "id": r.id,
                "reason": r.reason,
                "retry_after_s": r.retry_after_s,
            }
            for r in refused
        ],
    }
    missing: list[str] = []
    if args.wait:
        missing = fc.wait(ids, args.timeout_s, progress_printer("tasks", not args.json))
        out["summary"] = fc.summary(ids)
        out["missing"] = len(missing)
    print(
        json.dumps(out, sort_keys=True)
        if args.json
        else f"submitted {out['submitted']} task(s), rejected {out['rejected']}"
        + (f", {len(existing)} already recorded (not run again)" if existing else "")
        + (f"; {len(missing)} without an outcome after {args.timeout_s:g}s" if missing else "")
        + (
            f"; {len(refused)} refused by admission control (not queued; resubmit after "
            f"{report.retry_after_s}s): "
            + ", ".join(r.id for r in refused[:MAX_PROBLEMS_SHOWN])
            + (" ..." if len(refused) > MAX_PROBLEMS_SHOWN else "")
            if refused
            else ""
        )
    )
    return EXIT_INCOMPLETE if missing or refused else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit tasks from a JSON-lines file to a running fleet",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    p.add_argument("file", help="JSON lines, one task per line ('-' for stdin)")
    add_cluster_args(p, default_help=JOINS_RUNNING_CLUSTER)
    add_fleet_args(p)
    p.add_argument("--wait", action="store_true", help="wait for every outcome")
    p.add_argument("--timeout-s", type=float, default=600.0, help="how long --wait waits")
    p.add_argument(
        "--retry-refused-s",
        type=float,
        default=0.0,
        metavar="S",
        help="resubmit tasks admission control refused, after each Retry-After and "
        "throttled, for up to S seconds (default 0: report them and exit 1)",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="submit the valid tasks and report the invalid ones",
    )
    p.set_defaults(func=run)
