"""Options, output, errors and exit codes shared by the subcommands.

Every command exits with one of these codes (``fleet --help`` prints the same table):

- 0 (``EXIT_OK``): success.
- 1 (``EXIT_INCOMPLETE``): the run did not complete: tasks still missing after
  ``submit --wait``, a demo, bench, chaos or autoscale-trace run that lost tasks, a
  simulation that missed a target, a queue that stayed full; also an unexpected error (a
  bug: ``fleet --debug`` shows its traceback).
- 2 (``EXIT_USAGE``): bad input: usage (argparse's own), a bad spec or scenario, malformed
  task lines, an idempotency conflict, a file that cannot be read, several fleets running
  and none named.
- 3 (``EXIT_UNREACHABLE``): the cluster or the fleet cannot be reached or cannot run the
  fleet: nothing answers at the address, no such fleet, its actors not answering, or a
  pool the cluster cannot place (``PoolUnschedulable``: the spec may be fine, this
  cluster cannot run it).
- 130 (``EXIT_INTERRUPTED``): Ctrl-C.

A command reports an error by raising: ``CliError(message, code)`` for what it detects
itself, or any exception, which ``failure`` maps to a code and a one-line cause.
``fleet.cli.main.main`` prints ``fleet: <cause>`` (one line on stderr) and returns the
code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from fleet.spec import FleetSpec, SpecError, load_spec

if TYPE_CHECKING:
    from fleet.runtime.fleets import FleetRef

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit status:
  0    success
  1    the run did not complete (tasks missing or lost, targets missed), or a bug
  2    bad input (usage, spec, scenario, task lines, idempotency conflict, files)
  3    cannot reach the cluster or the fleet (address, fleet name, actors not
       answering), or the cluster cannot place the fleet's pools
  130  interrupted"""

MAX_CAUSE_CHARS = 1000  # a cause longer than this is cut (Ray's messages can run to pages)
MAX_PROBLEMS_SHOWN = 5  # malformed lines or invalid tasks named in one error line

_NOT_ANSWERING = "the fleet is not answering: "
# Exception classes and their exit codes, first match wins (so subclasses come before
# their bases). Each is looked up in sys.modules rather than imported: an exception of a
# module that was never imported cannot have been raised, and importing Ray (a second or
# more) only to classify an error would slow down the commands that never need it.
_EXITS: tuple[tuple[str, str, int, str], ...] = (
    ("fleet.runtime.deploy", "PoolUnschedulable", EXIT_UNREACHABLE, "cannot run here: "),
    ("fleet.runtime.deploy", "StorageNodeMissing", EXIT_UNREACHABLE, "cannot run here: "),
    ("fleet.runtime.enqueue", "QueueFullError", EXIT_INCOMPLETE, ""),
    ("fleet.task", "IdempotencyConflict", EXIT_USAGE, ""),
    ("fleet.runtime.controller", "ControlActorUnavailable", EXIT_UNREACHABLE, _NOT_ANSWERING),
    ("fleet.runtime.ratelimit", "LimiterUnavailable", EXIT_UNREACHABLE, _NOT_ANSWERING),
    ("ray.exceptions", "RayActorError", EXIT_UNREACHABLE, _NOT_ANSWERING),
    ("ray.exceptions", "GetTimeoutError", EXIT_UNREACHABLE, _NOT_ANSWERING),
    ("builtins", "BrokenPipeError", EXIT_INCOMPLETE, "output closed early: "),
    ("builtins", "ConnectionError", EXIT_UNREACHABLE, ""),
    ("builtins", "TimeoutError", EXIT_UNREACHABLE, ""),
    ("builtins", "ValueError", EXIT_USAGE, ""),  # SpecError, ScenarioError, TaskRejected...
)


class CliError(Exception):
    """An error a command found itself: printed as ``fleet: <message>``, exits ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def one_line(text: str, limit: int = MAX_CAUSE_CHARS) -> str:
    """A multi-line message as one line: ``"a:\\n  b\\n  c"`` becomes ``"a: b; c"``."""
    out = ""
    for part in (ln.strip() for ln in text.splitlines()):
        if part:
            out = part if not out else out + (" " if out.endswith(":") else "; ") + part
    return out if len(out) <= limit else out[: limit - 3] + "..."


def failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line cause for an exception a command raised."""
    if isinstance(exc, CliError):
        return exc.code, one_line(str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    task_error = getattr(sys.modules.get("ray.exceptions"), "RayTaskError", None)
    if task_error is not None and isinstance(exc, task_error):
        # An exception raised inside an actor: judge (and show) the actor's exception,
        # not the wrapper, whose message is the remote traceback.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
    if isinstance(exc, LookupError) and not isinstance(exc, KeyError | IndexError):
        return EXIT_UNREACHABLE, one_line(str(exc))  # no such fleet (KeyError: a bug)
    for module, name, code, prefix in _EXITS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return code, prefix + one_line(str(exc) or type(exc).__name__)
    if isinstance(exc, OSError) and exc.filename is not None:
        # A file named on the command line (or in a spec) that cannot be read.
        return EXIT_USAGE, f"{exc.filename}: {exc.strerror or exc}"
    return EXIT_INCOMPLETE, (
        f"unexpected {type(exc).__name__}: {one_line(str(exc))} "
        "(run `fleet --debug ...` for the traceback)"
    )


STARTS_LOCAL_CLUSTER = "start a local cluster on 127.0.0.1"
JOINS_RUNNING_CLUSTER = "auto: $RAY_ADDRESS, else the cluster running on this machine"


def add_cluster_args(
    p: argparse.ArgumentParser,
    json_help: str = "print the result as one JSON object on stdout",
    default_help: str = STARTS_LOCAL_CLUSTER,
) -> None:
    """``--address`` (its default, when not given, as ``default_help`` says) and
    ``--json``."""
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. 'auto', 127.0.0.1:6379 or ray://host:10001); "
        f"default: {default_help}",
    )
    p.add_argument("--json", action="store_true", help=json_help)


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    """``--fleet`` and ``--namespace``; ``resolve_fleet`` fills in what is left out."""
    p.add_argument(
        "--fleet",
        default=None,
        help="fleet name (default: the only fleet running on the cluster)",
    )
    p.add_argument(
        "--namespace",
        default=None,
        help="the fleet's Ray namespace (default: that of the one running fleet named "
        "--fleet, or of the only fleet running)",
    )


def resolve_fleet(args: argparse.Namespace, spec: FleetSpec | None = None) -> FleetRef:
    """The fleet a command acts on; call it once the cluster is joined.

    ``--fleet`` and ``--namespace`` as given; what is not given comes from ``spec`` when
    the command has one, else from the fleets running on the cluster: the one that
    matches what was given. None matching raises LookupError (exit 3), several a
    CliError asking to name one (exit 2: the command line must change, not the cluster).
    """
    from fleet.runtime.fleets import FleetRef, running_fleets

    name = args.fleet or (spec.name if spec else None)
    namespace = args.namespace or (spec.namespace if spec else None)
    if name and namespace:
        return FleetRef(name, namespace)
    # Filtering the running fleets also serves a lone --fleet or --namespace, and tells
    # "none" (3) from "several" (2).
    running = running_fleets()
    found = [f for f in running if name in (None, f.name) and namespace in (None, f.namespace)]
    if len(found) == 1:
        return found[0]
    listed = ", ".join(f"{f.name} (namespace {f.namespace})" for f in (found or running))
    if found:
        raise CliError(
            f"{len(found)} fleets run on this cluster ({listed}): "
            "name one with --fleet and --namespace",
            EXIT_USAGE,
        )
    wanted = "".join(
        (
            f" named {name!r}" if name else "",
            f" in namespace {namespace!r}" if namespace else "",
        )
    )
    raise LookupError(
        f"no fleet{wanted} runs on this cluster"
        + (f" (running: {listed})" if running else " (start one with `fleet run SPEC`)")
    )


def load_spec_or_exit(path: str) -> FleetSpec:
    """Load a spec; a bad one is a CliError (exit 2) naming each field at fault."""
    try:
        return load_spec(path)
    except SpecError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def emit(
    args: argparse.Namespace, data: dict[str, Any], human: Callable[[dict[str, Any]], str]
) -> None:
    """The result: one JSON object with ``--json``, else ``human(data)``."""
    if args.json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(human(data))


def draws_progress(wanted: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw ``\\r`` progress: asked for, and stderr is a terminal.

    Piped or redirected (a log file, CI, a test), stderr gets no progress at all: ``\\r``
    lines only make sense to a terminal, and the result is printed at the end anyway.
    """
    return wanted and (stream or sys.stderr).isatty()


def progress_printer(
    label: str, enabled: bool, stream: TextIO | None = None
) -> Callable[[int, int], None]:
    """Progress on stderr (``stream``), so ``--json`` stdout stays one clean object;
    nothing unless ``draws_progress``."""
    out = stream or sys.stderr
    draw = draws_progress(enabled, out)

    def show(done: int, total: int) -> None:
        if draw:
            print(
                f"\r{label}: {done}/{total} ({100 * done / max(total, 1):.0f}%)",
                end="",
                file=out,
                flush=True,
            )
            if done >= total:
                print(file=out)

    return show
