"""``fleet status``: pools, agents (and their health), hosts, queues, alerts, the ledger and
the control plane (each control actor's state and restarts) of a running fleet.

Exit status: 0 when the status was read (also while the controller restarts: the
control actors' states are then the answer), 3 when the cluster or the fleet cannot be
reached.
"""

from __future__ import annotations

import argparse
import time

from fleet.cli.common import (
    EXIT_OK,
    JOINS_RUNNING_CLUSTER,
    add_cluster_args,
    add_fleet_args,
    emit,
    resolve_fleet,
)

LAST_FAILURES_SHOWN = 5


def _human(st: dict) -> str:
    recorded = st["ledger"].get("recorded")
    lines = [
        f"fleet {st['fleet']}: {'?' if recorded is None else recorded} outcome(s) recorded"
    ]
    if st.get("dashboard_url"):
        lines.append(f"  Ray dashboard: {st['dashboard_url']}")
    lines.extend(_control_lines(st.get("control", {}), st.get("unavailable", {})))
    for name, p in st["pools"].items():
        q = p.get("queue", {})
        lines.append(
            f"  {name:<14} agents {p.get('agents', '?'):>5}  hosts {p.get('hosts', '?'):>3}"
            + (f" (+{p['hosts_stopping']} stopping)" if p.get("hosts_stopping") else "")
            + "  "
            f"in-flight {p.get('in_flight', 0):>6}  queued {q.get('depth', 0):>8}  "
            f"oldest {q.get('oldest_age_s', 0.0):6.1f}s  "
            f"redelivered {q.get('redelivered_total', 0)}"
            + (f"  preempted {p['preempted']}" if p.get("preempted") else "")
        )
        lines.extend(_health_lines(p))
        lines.extend(_admission_lines(p))
        lines.extend(_bulkhead_lines(q.get("bulkhead")))
        lines.extend(_degrade_lines(p.get("admission")))
    guard = st.get("health", {}).get("guard")
    if guard:
        h = st["health"]
        lines.append(
            f"  cascade guard {guard['state']}: {h['failing']} of {h['agents']} "
            f"agents failing (opens above {h['cascade_share']:.0%}); restarts "
            f"granted {guard['granted']}, throttled {guard['throttled']}"
        )
    lines.extend(_budget_lines(st.get("budgets")))
    for k in st.get("kafka", []):
        state = "running" if k.get("running") else f"stopped ({k.get('error')})"
        lines.append(
            f"  kafka consumer {k['consumer']}: {state}, consumed "
            f"{k.get('consumed', 0)}, dead-lettered {k.get('dead_lettered', 0)}, "
            f"committed {k.get('last_commit', {})}"
        )
    for a in st.get("alerts", {}).get("active", []):
        lines.append(
            f"  ALERT {a['severity']}: {a['rule']} on {a['subject']} "
            f"(value {a['value']:g}, threshold {a['threshold']:g})"
        )
    return "\n".join(lines)


def _control_lines(control: dict, unavailable: dict) -> list[str]:
    """One compact line while every control actor is alive and never restarted, else one
    line per actor; then whatever did not answer."""
    if not control:
        lines = ["  control plane: state unknown (Ray's GCS did not answer)"]
    elif all(a["state"] == "ALIVE" and a["restarts"] == 0 for a in control.values()):
        lines = [f"  control plane: {len(control)} actor(s) alive, no restarts"]
    else:
        down = sum(a["state"] != "ALIVE" for a in control.values())
        lines = [f"  control plane: {len(control) - down} of {len(control)} actor(s) alive"]
        width = max(len(n) for n in control)
        lines.extend(
            f"    {name:<{width}}  {a['state']:<18} restarts {a['restarts']}"
            for name, a in control.items()
        )
    lines.extend(
        f"    not read: {name} ({why})"
        for name, why in unavailable.items()
        if control.get(name, {}).get("state") in (None, "ALIVE")
    )
    return lines


def _health_lines(p: dict) -> list[str]:
    """A pool's agents by health state, and its last failures with their reasons."""
    h = p.get("health")
    if not h:
        return []
    lines = [
        f"    health: healthy {h['healthy']}  unhealthy {h['unhealthy']}  restarting "
        f"{h['restarting']}  ejected {h['ejected']} (health) + {h['breaker_ejected']} "
        f"(breakers)  starting {h['starting']}  restarts {h['restarts']}"
    ]
    for f in h.get("last_failures", [])[-LAST_FAILURES_SHOWN:]:
        when = time.strftime("%H:%M:%S", time.localtime(f["at_unix_s"]))
        lines.append(f"    {when} {f['agent_id']}: {f['reason']}: {f['detail'][:100]}")
    return lines


def _admission_lines(p: dict) -> list[str]:
    """A pool's admission control: its limit, the drain rate it predicts with, and what
    the entry points refused, by priority class and reason."""
    a = p.get("admission")
    if not a or not a.get("enabled"):
        return []
    drain = a.get("drain_per_s")
    refused = "  ".join(
        f"{cls} {'/'.join(f'{r} {n}' for r, n in sorted(by.items()))}"
        for cls, by in sorted(a.get("refused", {}).items())
    )
    return [
        f"    admission: max wait {a['max_queue_wait_s']:g}s  drain "
        + ("? (not measured yet)" if drain is None else f"{drain:g}/s")
        + ("  DOWN (refusing as unavailable)" if a.get("down") else "")
        + f"  refused: {refused or 'none'}"
    ]


def _degrade_lines(a: dict | None) -> list[str]:
    """A pool's degrade rule: the rule holding now, and the tasks it degraded (sent to
    its fallback or answered from its cache) by priority class."""
    if not a or not (a.get("degraded") or a.get("degraded_tasks")):
        return []
    sent = ", ".join(f"{c} {n}" for c, n in sorted(a.get("degraded_tasks", {}).items()))
    now = f"DEGRADED ({a['degraded']})" if a.get("degraded") else "not degraded now"
    return [f"    degrade: {now}  degraded (fallback or cache): {sent or 'none'}"]


def _bulkhead_lines(b: dict | None) -> list[str]:
    """A pool's tenants against their bulkheads: queued and in flight by tenant, the
    tasks held back at an in-flight limit now, and those refused at a queued limit."""
    if not b:
        return []

    def by(d: dict[str, int]) -> str:
        return ", ".join(f"{t} {n}" for t, n in sorted(d.items())) or "none"

    return [
        f"    bulkheads: queued {by(b['queued'])}  in flight {by(b['in_flight'])}  "
        f"held back {b['held_back']}  refused {by(b['refused'])}"
    ]


def _budget_lines(b: dict | None) -> list[str]:
    """Spend and burn per fleet, pool, tenant and top agent, and the latest alerts."""
    if not b:
        return []
    f = b["fleet"]
    limit = f"{f['limit_usd']:g}" if f.get("limit_usd") is not None else "-"
    lines = [
        f"  budget: fleet spent ${f['used_usd']:.4f} of ${limit} today, reserved "
        f"${f['reserved_usd']:.4f}, burn ${f['burn_usd_per_h']:.4f}/h; refused "
        f"{sum(b.get('refused_tasks', {}).values())} task(s), "
        f"{b.get('expired_reservations', 0)} expired reservation(s)"
    ]
    for section, label in (("pools", "pool"), ("tenants", "tenant"), ("top_agents", "agent")):
        for name, row in list(b.get(section, {}).items())[:10]:
            lim = f" of ${row['limit_usd']:g}" if "limit_usd" in row else ""
            lines.append(
                f"    {label:<6} {name:<24} ${row['spend_usd']:.4f}{lim}  "
                f"{row['tasks']} task(s)  burn ${row['burn_usd_per_h']:.4f}/h"
            )
    lines.extend(f"    ALERT budget: {m}" for m in b.get("alerts", []))
    return lines


def _while_controller_restarts(fleet: str, namespace: str) -> dict | None:
    """When the controller is not ALIVE (joining the fleet asks it for the spec, and
    that call would wait for its restart): the state of every actor of the fleet, from
    Ray's GCS. None when it is ALIVE or missing (joining then answers as usual)."""
    import ray

    from fleet.runtime.lifecycle import ALIVE, MISSING, actor_states
    from fleet.runtime.names import Names

    ctl = Names(fleet).controller
    state = actor_states(namespace, [ctl])[ctl]["state"]
    if state in (ALIVE, MISSING):
        return None
    limiter = Names(fleet).ratelimit  # the ingress's, not a control actor
    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
        and a["name"].startswith(f"{fleet}.")
        and a["name"] != limiter
    )
    return {
        "fleet": fleet,
        "ledger": {"recorded": None},
        "pools": {},
        "control": actor_states(namespace, names),
        "unavailable": {ctl: state},
    }


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import FleetClient, dashboard_url, init_ray

    init_ray(args.address or "auto")
    ref = resolve_fleet(args)
    partial = _while_controller_restarts(ref.name, ref.namespace)
    if partial is not None:
        emit(args, {**partial, "dashboard_url": dashboard_url()}, _human)
        return EXIT_OK
    fc = FleetClient.connect(ref.name, ref.namespace)
    emit(args, {**fc.status(), "dashboard_url": dashboard_url()}, _human)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show a running fleet's pools, queues and ledger",
        description="Show a running fleet's pools, agents and their health, hosts, "
        "queues, alerts, ledger and control plane. "
        + __doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    add_cluster_args(p, default_help=JOINS_RUNNING_CLUSTER)
    add_fleet_args(p)
    p.set_defaults(func=run)
