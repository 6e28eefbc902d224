"""``fleet status``: pools, agents (and their health), hosts, queues, alerts and the ledger
of a running fleet."""

from __future__ import annotations

import argparse
import sys
import time

from fleet.cli.common import add_cluster_args, add_fleet_args, emit

LAST_FAILURES_SHOWN = 5


def _human(st: dict) -> str:
    lines = [f"fleet {st['fleet']}: {st['ledger']['recorded']} outcome(s) recorded"]
    for name, p in st["pools"].items():
        q = p.get("queue", {})
        lines.append(
            f"  {name:<14} agents {p.get('agents', '?'):>5}  hosts {p.get('hosts', '?'):>3}"
            + (f" (+{p['hosts_stopping']} stopping)" if p.get("hosts_stopping") else "") + "  "
            f"in-flight {p.get('in_flight', 0):>6}  queued {q.get('depth', 0):>8}  "
            f"oldest {q.get('oldest_age_s', 0.0):6.1f}s  redelivered {q.get('redelivered_total', 0)}")
        lines.extend(_health_lines(p))
    guard = st.get("health", {}).get("guard")
    if guard:
        h = st["health"]
        lines.append(f"  cascade guard {guard['state']}: {h['failing']} of {h['agents']} "
                     f"agents failing (opens above {h['cascade_share']:.0%}); restarts "
                     f"granted {guard['granted']}, throttled {guard['throttled']}")
    lines.extend(_budget_lines(st.get("budgets")))
    for k in st.get("kafka", []):
        state = "running" if k.get("running") else f"stopped ({k.get('error')})"
        lines.append(f"  kafka consumer {k['consumer']}: {state}, consumed "
                     f"{k.get('consumed', 0)}, dead-lettered {k.get('dead_lettered', 0)}, "
                     f"committed {k.get('last_commit', {})}")
    for a in st.get("alerts", {}).get("active", []):
        lines.append(f"  ALERT {a['severity']}: {a['rule']} on {a['subject']} "
                     f"(value {a['value']:g}, threshold {a['threshold']:g})")
    return "\n".join(lines)


def _health_lines(p: dict) -> list[str]:
    """A pool's agents by health state, and its last failures with their reasons."""
    h = p.get("health")
    if not h:
        return []
    lines = [f"    health: healthy {h['healthy']}  unhealthy {h['unhealthy']}  restarting "
             f"{h['restarting']}  ejected {h['ejected']} (health) + {h['breaker_ejected']} "
             f"(breakers)  starting {h['starting']}  restarts {h['restarts']}"]
    for f in h.get("last_failures", [])[-LAST_FAILURES_SHOWN:]:
        when = time.strftime("%H:%M:%S", time.localtime(f["at_unix_s"]))
        lines.append(f"    {when} {f['agent_id']}: {f['reason']}: {f['detail'][:100]}")
    return lines


def _budget_lines(b: dict | None) -> list[str]:
    """Spend and burn per fleet, pool, tenant and top agent, and the latest alerts."""
    if not b:
        return []
    f = b["fleet"]
    limit = f"{f['limit_usd']:g}" if f.get("limit_usd") is not None else "-"
    lines = [f"  budget: fleet spent ${f['used_usd']:.4f} of ${limit} today, reserved "
             f"${f['reserved_usd']:.4f}, burn ${f['burn_usd_per_h']:.4f}/h; refused "
             f"{sum(b.get('refused_tasks', {}).values())} task(s), "
             f"{b.get('expired_reservations', 0)} expired reservation(s)"]
    for section, label in (("pools", "pool"), ("tenants", "tenant"), ("top_agents", "agent")):
        for name, row in list(b.get(section, {}).items())[:10]:
            lim = f" of ${row['limit_usd']:g}" if "limit_usd" in row else ""
            lines.append(f"    {label:<6} {name:<24} ${row['spend_usd']:.4f}{lim}  "
                         f"{row['tasks']} task(s)  burn ${row['burn_usd_per_h']:.4f}/h")
    lines.extend(f"    ALERT budget: {m}" for m in b.get("alerts", []))
    return lines


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
