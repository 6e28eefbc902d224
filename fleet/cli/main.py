"""``fleet``: the command-line entry point. Each subcommand lives in its own module.

Errors are handled here, once for every command: an exception from a command becomes
one line on stderr, ``fleet: <cause>``, and the exit code of ``fleet.cli.common.failure``
(the table is in ``fleet.cli.common`` and in ``fleet --help``); ``fleet --debug ...``
prints the traceback instead of the line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from fleet.cli.common import EXIT_CODES_HELP, failure

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
    "fleet.cli.manage",
    "fleet.cli.rules",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="Run societies of AI agents on Ray.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print its traceback instead of one line (put it before COMMAND)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        code, cause = failure(exc)
        if args.debug:
            traceback.print_exc()
        else:
            print(f"fleet: {cause}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
