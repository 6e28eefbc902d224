"""``fleet rules [SPEC] [--out FILE]``: the Prometheus rules of a fleet, from its spec.

Prints (or writes to ``--out``) a Prometheus rule file: recording rules over fleet's
exported metrics and the alerts (queue depth and age, breaker ejections, agent cascade,
control-actor restarts, budget burn, p95 latency, and every rule of ``queues.alerts``)
with the thresholds of the spec, so Prometheus and fleet's in-process evaluators judge
the fleet alike (``fleet.observability.rules``). Load it with ``rule_files`` in
``prometheus.yml`` (``monitoring/prometheus/prometheus.yml`` is an example). No Ray
cluster is needed.

Exit status: 0 on success, 2 for a bad spec or an output file that cannot be written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fleet.cli.common import EXIT_OK, load_spec_or_exit


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "rules",
        help="print the Prometheus recording and alerting rules of a fleet spec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec",
        nargs="?",
        default=None,
        help="fleet spec (YAML; default: the demo fleet's, as `fleet demo` runs it)",
    )
    p.add_argument("--out", default=None, help="write the rules to FILE instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fleet.cli.demo import demo_spec_path
    from fleet.observability.rules import render_rules_yaml

    text = render_rules_yaml(load_spec_or_exit(args.spec or demo_spec_path()))
    if args.out is None:
        print(text, end="")
    else:
        Path(args.out).write_text(text)  # OSError with its filename: exit 2
    return EXIT_OK
