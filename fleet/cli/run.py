"""``fleet run SPEC``: start a fleet and keep it serving until interrupted."""

from __future__ import annotations

import argparse
import json
import signal
import time

from fleet.cli.common import add_cluster_args, load_spec_or_exit

STATUS_EVERY_S = 5.0


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import FleetClient, init_ray

    spec = load_spec_or_exit(args.spec)
    init_ray(args.address)
    fc = FleetClient.start(spec, detached=args.detach, http=args.http)
    print(
        json.dumps(
            {
                "fleet": spec.name,
                "namespace": spec.namespace,
                "state": "running",
                "pools": [p.name for p in spec.pools],
            }
        ),
        flush=True,
    )
    if args.detach:
        return 0
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
            line = {
                p: {k: v.get(k) for k in ("agents", "hosts", "queue_depth", "in_flight")}
                for p, v in st["pools"].items()
            }
            print(
                json.dumps({"status": line, "recorded": st["ledger"]["recorded"]}), flush=True
            )
    except KeyboardInterrupt:
        pass
    finally:
        fc.shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="start a fleet from a spec and keep it running",
        description="Deploy the fleet described by SPEC and serve until "
        "Ctrl-C (or --duration-s). Other terminals reach it with "
        "`fleet submit`/`fleet status --address auto`.",
    )
    p.add_argument("spec", help="fleet spec (YAML)")
    add_cluster_args(p)
    p.add_argument(
        "--detach",
        action="store_true",
        help="leave the fleet running after this command exits (detached actors)",
    )
    p.add_argument("--http", action="store_true", help="start Serve's HTTP proxy on 127.0.0.1")
    p.add_argument(
        "--duration-s", type=float, default=None, help="stop after this many seconds"
    )
    p.set_defaults(func=run)
