"""``fleet run SPEC``: start a fleet and keep it serving until interrupted."""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import Any

from fleet.cli.common import EXIT_OK, add_cluster_args, load_spec_or_exit

STATUS_EVERY_S = 5.0


def _say(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    """One line now (flushed: a log follows it live), JSON with ``--json``."""
    print(json.dumps(data, sort_keys=True) if args.json else human, flush=True)


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import FleetClient, dashboard_url, init_ray
    from fleet.runtime.fleets import pool_lines

    spec = load_spec_or_exit(args.spec)
    init_ray(
        args.address,
        dashboard=not args.no_dashboard,
        log_format=spec.observability.log_format,
    )
    fc = FleetClient.start(spec, detached=args.detach, http=args.http)
    pools = [p.name for p in spec.pools]
    url = dashboard_url()
    _say(
        args,
        {
            "fleet": spec.name,
            "namespace": spec.namespace,
            "state": "running",
            "pools": pools,
            "dashboard_url": url,
        },
        f"fleet {spec.name} (namespace {spec.namespace}) running: pools {', '.join(pools)}"
        + (f"; Ray dashboard at {url}" if url else ""),
    )
    if args.detach:
        return EXIT_OK
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        deadline = time.monotonic() + args.duration_s if args.duration_s else None
        while not stop and (deadline is None or time.monotonic() < deadline):
            time.sleep(
                STATUS_EVERY_S
                if deadline is None
                else min(STATUS_EVERY_S, max(0.0, deadline - time.monotonic()))
            )
            st = fc.status()
            line = pool_lines(st["pools"])
            recorded = st["ledger"]["recorded"]
            _say(
                args,
                {"status": line, "recorded": recorded},
                f"{recorded} recorded; "
                + "; ".join(
                    f"{p}: {v['agents']} agents, {v['hosts']} hosts, "
                    f"{v['queue_depth']} queued, {v['in_flight']} in flight"
                    for p, v in line.items()
                ),
            )
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a foreground fleet is stopped: a success
    finally:
        fc.shutdown()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="start a fleet from a spec and keep it running",
        description="Deploy the fleet described by SPEC and serve until "
        "Ctrl-C (or --duration-s), printing a status line every 5 s. Other terminals "
        "reach it with `fleet submit`/`fleet status --address auto`.",
    )
    p.add_argument("spec", help="fleet spec (YAML)")
    add_cluster_args(
        p,
        json_help="print JSON lines: one object when the fleet runs, then one per status line",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="leave the fleet running after this command exits (detached actors)",
    )
    p.add_argument("--http", action="store_true", help="start Serve's HTTP proxy on 127.0.0.1")
    p.add_argument(
        "--no-dashboard",
        action="store_true",
        help="start the local cluster without Ray's dashboard (it runs on 127.0.0.1 "
        "otherwise; metrics are exported either way)",
    )
    p.add_argument(
        "--duration-s", type=float, default=None, help="stop after this many seconds"
    )
    p.set_defaults(func=run)
