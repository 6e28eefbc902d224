"""``fleet submit FILE``: submit tasks (JSON lines) to a running fleet."""

from __future__ import annotations

import argparse
import json
import sys

from fleet.cli.common import EXIT_USAGE, add_cluster_args, add_fleet_args, progress_printer
from fleet.task import IdempotencyConflict, TaskRejected, parse_task_json


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


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import FleetClient, QueueFullError, init_ray

    tasks, bad = read_tasks(args.file)
    if bad and not args.skip_invalid:
        for _, msg in bad:
            print(f"fleet: rejected {msg}", file=sys.stderr)
        print(
            f"fleet: {len(bad)} malformed line(s); nothing submitted "
            "(use --skip-invalid to submit the valid ones)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    init_ray(args.address or "auto")
    try:
        fc = FleetClient.connect(args.fleet, args.namespace)
    except LookupError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    items, report = fc.validate(tasks)
    if report.rejected and not args.skip_invalid:
        for k, msg in report.rejected:
            print(f"fleet: rejected task {k + 1}: {msg}", file=sys.stderr)
        return EXIT_USAGE
    try:
        existing = fc.submit_items(items, generated=report.generated)
    except IdempotencyConflict as exc:
        print(f"fleet: {exc}; nothing submitted", file=sys.stderr)
        return EXIT_USAGE
    except QueueFullError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    ids = [it.id for it in items]
    # Tasks that already have an outcome were not run again; their outcome is the answer.
    out = {
        "submitted": len(ids),
        "rejected": len(report.rejected) + len(bad),
        "ids": ids,
        "already_recorded": len(existing),
    }
    if args.wait:
        missing = fc.wait(ids, args.timeout_s, progress_printer("tasks", not args.json))
        out["summary"] = fc.summary(ids)
        out["missing"] = len(missing)
    print(
        json.dumps(out, sort_keys=True)
        if args.json
        else f"submitted {out['submitted']} task(s), rejected {out['rejected']}"
        + (f", {len(existing)} already recorded (not run again)" if existing else "")
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit tasks from a JSON-lines file to a running fleet")
    p.add_argument("file", help="JSON lines, one task per line ('-' for stdin)")
    add_cluster_args(p)
    add_fleet_args(p)
    p.add_argument("--wait", action="store_true", help="wait for every outcome")
    p.add_argument("--timeout-s", type=float, default=600.0, help="how long --wait waits")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="submit the valid tasks and report the invalid ones",
    )
    p.set_defaults(func=run)
