"""``fleet simulate SPEC``: run a scenario in the discrete-event simulator (no Ray).

Exit status: 0 when every target of the scenario is met (0 lost, autoscaler within its
bounds and rates, p99 and recovery within their targets), 1 when one is missed, 2 when
the scenario is invalid (each problem named with its line and field, on one line).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fleet.cli.common import EXIT_INCOMPLETE, EXIT_OK, draws_progress


def _human(r: dict[str, Any]) -> str:
    lat = r["latency_s"]
    lines = [
        f"scenario {r['scenario']} (seed {r['seed']}): {r['tasks']} tasks, "
        f"{r['sim_time_s']:.0f} s simulated in {r['wall_s']:.1f} s wall "
        f"({r['events_per_s']:.0f} events/s)",
        f"  completed {r['completed']}  failed {r['failed']} {r['failed_by_reason']}  "
        f"lost {r['lost']}  agents max {r['agents_max']}",
        f"  latency s: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}",
        f"  throughput/s: mean {r['throughput_per_s']['mean']:.1f}  "
        f"peak {r['throughput_per_s']['peak']:.1f}  utilization {r['utilization']:.2f}",
        f"  cost: ${r['cost']['usd']:.2f} total, "
        f"${r['cost']['usd_per_1000_tasks'] or 0:.4f} per 1,000 tasks",
        f"  chaos: {len(r['chaos']['injections'])} injections, {r['chaos']['kills']} agents "
        f"killed, max recovery {r['chaos']['max_recovery_s']} s",
    ]
    for name, p in r["pools"].items():
        a = p["autoscaler"]
        lines.append(
            f"  pool {name}: p99 {p['latency_s']['p99']} s, agents <= {p['agents']['max']}, "
            f"utilization {p['utilization']:.2f}, autoscaler {'ok' if a['ok'] else 'VIOLATED'}"
            + ("" if a["ok"] else f": {a['problems'][0]}")
        )
        o = p.get("overload")
        if o is not None and o["offered"]:
            share = o["goodput_share"]
            classes = ", ".join(
                f"{c} {v['shed_share']:.0%}/{v['degraded_share']:.0%}"
                for c, v in o["classes"].items()
                if v["offered"]
            )
            lines.append(
                f"    overload: offered {o['offered']}, goodput {o['goodput']}"
                + (f" ({share:.2f} of capacity)" if share is not None else "")
                + f", refused {o['shed_share']:.0%}, degraded {o['degraded_share']:.0%}"
                + f"; refused/degraded by class: {classes}"
            )
        if p.get("preempted"):
            lines.append(
                f"    preempted {p['preempted']} runs of {p['preempted_tasks']} tasks "
                f"(max {p['preempted_max_per_task']} per task), "
                f"{p['preempted_lost_s']:.1f} agent-s of work lost"
            )
    lines.append("  targets:")
    for name, t in sorted(r["targets"].items()):
        detail = f" {t.get('value')} (target {t.get('target')})" if "target" in t else ""
        lines.append(f"    {name}: {'met' if t['met'] else 'MISSED'}{detail}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fleet.sim import Simulation, load_scenario, report_json, write_plots

    scenario = load_scenario(args.spec)  # ScenarioError: a ValueError, exit 2

    def progress(t: float, tasks: int) -> None:
        print(
            f"\rsimulating {scenario.name}: t={t:.0f}s, {tasks} tasks",
            end="",
            file=sys.stderr,
            flush=True,
        )

    show = draws_progress(not args.quiet)
    sim = Simulation(scenario, seed=args.seed, progress=progress if show else None).run()
    if show:
        print(file=sys.stderr)
    report = sim.report()
    if args.plot:
        files = write_plots(report, args.plot)
        print(f"plots: {', '.join(str(f) for f in files)}", file=sys.stderr)
    if args.json:
        print(report_json(report, timing=not args.no_timing))
    else:
        print(_human(report))
    return EXIT_OK if report["targets_met"] else EXIT_INCOMPLETE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a scenario in the discrete-event simulator (no Ray)",
        description="Simulate a fleet spec under a scenario's workload, failures and chaos, "
        "with fleet's real autoscaling, routing, batching, breaker, retry and "
        "restart policies. Exit 0 "
        "when the scenario's targets are met, 1 when not, 2 on a bad scenario.",
    )
    p.add_argument("spec", metavar="SPEC", help="scenario YAML (see examples/scenarios/)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="override the scenario's seed (same spec and seed: same report)",
    )
    p.add_argument(
        "--no-timing",
        action="store_true",
        help="leave wall_s and events_per_s out of the JSON, which is then "
        "byte-identical for the same spec and seed",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
