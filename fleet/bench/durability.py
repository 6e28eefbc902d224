"""Durability benchmark: kill -9 a queue shard in the middle of a run on SQLite queues.

A fleet of no-op agents whose queue shards keep their items in SQLite (WAL) is given
100,000 tasks (20,000 with ``--quick``). Once a third of them is recorded, the process
of one shard is SIGKILLed; Ray restarts it and it reloads what was not acked. Reported:

- ``lost``: accepted tasks with no outcome in the ledger at the end (must be 0);
- ``recorded_twice``: ledger entries beyond one per submitted task (must be 0; the
  ledger keeps one outcome per id, so a redelivery under a new id would show here);
- ``duplicate_executions``: outcomes reported again for an id already recorded
  (redeliveries after the kill, absorbed by the ledger);
- ``duration_s`` (first submit to last outcome), ``tasks_per_s``, and when the kill
  landed (``recorded_at_kill``, ``restart_s`` until the shard answered again).

Figures only: nothing is asserted here.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Any

from fleet.spec import FleetSpec, parse_spec

FULL_TASKS = 100_000
QUICK_TASKS = 20_000
KILL_AT_SHARE = 1 / 3
AGENTS = 500
WAIT_TIMEOUT_S = 600.0


def bench_spec(directory: str) -> FleetSpec:
    return parse_spec({
        "name": "durability-bench", "namespace": "fleet-bench-durability",
        "queues": {"shards": 2, "lease_s": 15, "batch": {"max_items": 512},
                   "storage": {"backend": "sqlite", "directory": directory}},
        "pools": [{
            "name": "noop", "capability": "noop",
            "agent_class": "fleet.agents.examples:NoopAgent",
            "agents_per_host": AGENTS // 2, "cpus_per_host": 0,
            "autoscaling": {"min_agents": AGENTS, "max_agents": AGENTS},
        }],
    })


def run(quick: bool = False, tasks: int | None = None) -> dict[str, Any]:
    import ray

    from fleet.runtime.client import FleetClient

    n = tasks or (QUICK_TASKS if quick else FULL_TASKS)
    directory = tempfile.mkdtemp(prefix="fleet-durability-")
    spec = bench_spec(directory)
    fc = FleetClient.start(spec)
    try:
        shard = ray.get_actor(fc.names.shard("noop", 0), namespace=spec.namespace)
        items, _ = fc.validate({"capability": "noop", "payload": i} for i in range(n))
        ids = [it.id for it in items]
        t0 = time.time()
        fc.submit_items(items)
        submitted_s = time.time() - t0
        while (recorded := fc.summary(ids)["recorded"]) < n * KILL_AT_SHARE:
            time.sleep(0.05)
        pid = ray.get(shard.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:  # the restarted shard answers once it has reloaded its SQLite file
            try:
                new_pid = ray.get(shard.__ray_call__.remote(lambda self: os.getpid()),
                                  timeout=60)
                break
            except ray.exceptions.RayActorError:
                time.sleep(0.05)
        restart_s = time.monotonic() - killed
        missing = fc.wait(ids, timeout_s=WAIT_TIMEOUT_S)
        s = fc.summary(ids)
        in_ledger = fc.status()["ledger"]["recorded"]
    finally:
        fc.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    span = s["last_finish_unix_s"] - s["first_submit_unix_s"]
    return {
        "backend": "sqlite",
        "tasks": n,
        "lost": len(missing),
        "recorded_twice": in_ledger - s["recorded"],
        "duplicate_executions": s["duplicate_executions"],
        "completed": s["completed"],
        "failed": s["failed"],
        "recorded_at_kill": recorded,
        "shard_restarted": new_pid != pid,
        "restart_s": round(restart_s, 2),
        "submit_s": round(submitted_s, 2),
        "duration_s": round(span, 2),
        "tasks_per_s": round(n / span, 1) if span > 0 else 0.0,
        "latency_s": s["latency_s"],
    }
