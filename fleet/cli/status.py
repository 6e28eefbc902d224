"""``fleet status``: pools, agents, hosts, queues and the ledger of a running fleet."""

from __future__ import annotations

import argparse
import sys

from fleet.cli.common import add_cluster_args, add_fleet_args, emit


def _human(st: dict) -> str:
    lines = [f"fleet {st['fleet']}: {st['ledger']['recorded']} outcome(s) recorded"]
    for name, p in st["pools"].items():
        q = p.get("queue", {})
        lines.append(
            f"  {name:<14} agents {p.get('agents', '?'):>5}  hosts {p.get('hosts', '?'):>3}"
            + (f" (+{p['hosts_stopping']} stopping)" if p.get("hosts_stopping") else "") + "  "
            f"in-flight {p.get('in_flight', 0):>6}  queued {q.get('depth', 0):>8}  "
            f"oldest {q.get('oldest_age_s', 0.0):6.1f}s  redelivered {q.get('redelivered_total', 0)}")
    for a in st.get("alerts", {}).get("active", []):
        lines.append(f"  ALERT {a['severity']}: {a['rule']} on {a['subject']} "
                     f"(value {a['value']:g}, threshold {a['threshold']:g})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import FleetClient, init_ray

    init_ray(args.address or "auto")
    try:
        fc = FleetClient.connect(args.fleet, args.namespace)
    except LookupError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    emit(args, fc.status(), _human)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a running fleet's pools, queues and ledger")
    add_cluster_args(p)
    add_fleet_args(p)
    p.set_defaults(func=run)
