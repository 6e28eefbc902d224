"""``fleet list``, ``fleet stop`` and ``fleet apply``: the life cycle of a running fleet
(``fleet.runtime.manage``)."""

from __future__ import annotations

import argparse
from typing import Any

from fleet.cli.common import (
    EXIT_OK,
    JOINS_RUNNING_CLUSTER,
    CliError,
    add_cluster_args,
    add_fleet_args,
    emit,
    load_spec_or_exit,
    resolve_fleet,
)


def _list_human(data: dict[str, Any]) -> str:
    if not data["fleets"]:
        return "no fleet runs on this cluster"
    lines = []
    for f in data["fleets"]:
        head = f"{f['fleet']} (namespace {f['namespace']}): {f['state']}"
        if f["state"] != "running":
            lines.append(f"{head}: {f.get('reason', '')}")
            continue
        lines.append(head)
        for name, p in f["pools"].items():
            lines.append(
                f"  {name}: {p['agents']} agents on {p['hosts']} hosts, "
                f"{p['queue_depth']} queued, {p['in_flight']} running"
            )
    return "\n".join(lines)


def list_fleets(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray
    from fleet.runtime.fleets import describe, running_fleets

    init_ray(args.address or "auto")
    emit(args, {"fleets": [describe(f) for f in running_fleets()]}, _list_human)
    return EXIT_OK


def stop(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray
    from fleet.runtime.manage import stop as stop_fleet

    if args.timeout_s <= 0:
        raise CliError(f"--timeout-s must be > 0, not {args.timeout_s:g}")
    init_ray(args.address or "auto")
    args.fleet = args.fleet or args.name
    ref = resolve_fleet(args)
    out = stop_fleet(ref.name, ref.namespace, drain=args.drain, timeout_s=args.timeout_s)

    def human(d: dict[str, Any]) -> str:
        how = {None: "", True: " after draining", False: " (drain timed out)"}[d["drained"]]
        left = f"; {d['left_queued']} task(s) stay queued on disk" if d["left_queued"] else ""
        return f"stopped {d['fleet']}{how}{left}"

    emit(args, out, human)
    return EXIT_OK


def apply(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray
    from fleet.runtime.manage import ApplyRefused
    from fleet.runtime.manage import apply as apply_spec

    spec = load_spec_or_exit(args.spec)
    init_ray(args.address or "auto")
    try:
        out = apply_spec(spec)
    except ApplyRefused as exc:
        raise CliError(f"nothing changed: {exc}") from exc

    def human(d: dict[str, Any]) -> str:
        if not d["changed"]:
            return f"{spec.name}: unchanged"
        parts = [f"{spec.name}: applied {len(d['changed'])} change(s)"]
        for key, label in (
            ("pools_added", "pools added"),
            ("pools_removed", "pools removed"),
            ("hosts_replaced", "hosts replaced"),
        ):
            if d[key]:
                parts.append(f"{label}: {', '.join(d[key])}")
        return "; ".join(parts)

    emit(args, {"fleet": spec.name, "namespace": spec.namespace, **out}, human)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="the fleets running on a cluster, with their pools' agents, hosts and queues",
    )
    add_cluster_args(p, default_help=JOINS_RUNNING_CLUSTER)
    p.set_defaults(func=list_fleets)

    p = sub.add_parser(
        "stop",
        help="stop a running fleet (its queued tasks stay on disk for the next run)",
        description="Stop the fleet's actors and hosts. Its queue and outcomes stay in "
        "its storage directory: `fleet run` of the same spec resumes the queued tasks. "
        "--drain first waits until nothing is queued or running.",
    )
    p.add_argument("name", nargs="?", default=None, help="the fleet (default: the only one)")
    add_fleet_args(p)
    add_cluster_args(p, default_help=JOINS_RUNNING_CLUSTER)
    p.add_argument(
        "--drain", action="store_true", help="wait until nothing is queued or running"
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=600.0,
        help="with --drain: stop anyway after this many seconds (default: 600)",
    )
    p.set_defaults(func=stop)

    p = sub.add_parser(
        "apply",
        help="change a running fleet to a spec, in place, losing nothing",
        description="Update the running fleet the spec names: autoscaling bounds and "
        "rates, routing, breakers, budgets, resilience, health, queue alerts, pools added "
        "or removed, agent class or kwargs (hosts are replaced one by one). What cannot "
        "change in place (shard count, storage, the namespace, a pool's capability, ...) "
        "is refused, naming the field, and nothing changes.",
    )
    p.add_argument("spec", help="the new fleet spec (YAML)")
    add_cluster_args(p, default_help=JOINS_RUNNING_CLUSTER)
    p.set_defaults(func=apply)
