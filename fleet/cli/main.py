"""``fleet``: the command-line entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)``, which adds its parser and sets
# ``func=<callable(args) -> int>``.
COMMANDS = (
    "fleet.cli.demo",
    "fleet.cli.run",
    "fleet.cli.submit",
    "fleet.cli.status",
    "fleet.cli.bench",
    "fleet.cli.simulate",
    "fleet.cli.trace",
    "fleet.cli.chaos",
    "fleet.cli.keys",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet", description="Run societies of AI agents on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
