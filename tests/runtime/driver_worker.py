"""A driver process for the driver kill -9 test: starts a detached fleet and submits.

It joins the cluster at ADDRESS, starts the fleet in SPEC (a JSON file) with detached
actors, then submits TASKS tasks in chunks. After each chunk is accepted (``submit``
returned) it appends the chunk's ids to IDS, flushed and fsync'd, so the file never
names a task the fleet did not accept. It prints ``STARTED`` once the fleet is up.

Run: python -m tests.runtime.driver_worker ADDRESS SPEC IDS TASKS CHUNK
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray

from fleet.runtime.client import FleetClient
from fleet.spec import parse_spec


def main() -> int:
    address, spec_path, ids_path, tasks, chunk = *sys.argv[1:4], *map(int, sys.argv[4:6])
    spec = parse_spec(__import__("json").loads(Path(spec_path).read_text()))
    ray.init(
        address=address, namespace=spec.namespace, log_to_driver=False, configure_logging=False
    )
    fc = FleetClient.start(spec, detached=True)
    print("STARTED", flush=True)
    with open(ids_path, "a") as out:
        for first in range(0, tasks, chunk):
            rep = fc.submit(
                [
                    {"capability": "work", "payload": {"i": i}}
                    for i in range(first, min(tasks, first + chunk))
                ]
            )
            out.write("".join(f"{i}\n" for i in rep.accepted))
            out.flush()
            os.fsync(out.fileno())
    print("SUBMITTED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
