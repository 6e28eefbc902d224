"""Options and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from fleet.spec import FleetSpec, SpecError, load_spec

EXIT_USAGE = 2


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. 'auto' or ray://host:10001); "
        "default: start a local cluster on 127.0.0.1",
    )
    p.add_argument(
        "--json", action="store_true", help="print one machine-readable JSON object"
    )


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", default="fleet", help="fleet name (default: fleet)")
    p.add_argument("--namespace", default="fleet", help="fleet namespace (default: fleet)")


def load_spec_or_exit(path: str) -> FleetSpec:
    try:
        return load_spec(path)
    except SpecError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def emit(
    args: argparse.Namespace, data: dict[str, Any], human: Callable[[dict[str, Any]], str]
) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(human(data))


def progress_printer(label: str, enabled: bool) -> Callable[[int, int], None]:
    """Progress on stderr, so ``--json`` stdout stays one clean object."""

    def show(done: int, total: int) -> None:
        if enabled:
            print(
                f"\r{label}: {done}/{total} ({100 * done / max(total, 1):.0f}%)",
                end="",
                file=sys.stderr,
                flush=True,
            )
            if done >= total:
                print(file=sys.stderr)

    return show
