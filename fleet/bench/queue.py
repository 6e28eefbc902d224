"""Queue benchmark: a million pending tasks per storage backend, memory and speed.

For each backend (``memory``, ``sqlite``), in a fresh Python process so one backend's
freed memory cannot flatter the next one's figure:

1. fill a ``LeaseQueue`` with ``tasks`` pending tasks, each with its own 256-byte JSON
   payload and a 32-character id, in batches of ``BATCH`` (one ``put`` each, as the
   submit path sends them); ``enqueue_per_s`` counts only the time inside ``put``;
2. ``bytes_per_pending_task``: growth of the process's resident memory (psutil RSS)
   from before the queue existed to when it holds every task, divided by ``tasks``:
   everything the queue keeps per task, payload included (target <= 1,024);
3. drain it: ``lease`` a batch and ``ack`` it, until empty; ``dequeue_per_s`` is tasks
   per second of that loop, and the age of the oldest pending item is sampled as it
   drains (``oldest_age_s``: at the start, half way, and the largest seen).

Run: ``fleet bench queue --json`` (``--quick``: 50,000 tasks). Needs no Ray.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

NEEDS_RAY = False
BATCH = 1_000
PAYLOAD_BYTES = 256
BACKENDS = ("memory", "sqlite")


def _payload(k: int) -> bytes:
    """A distinct JSON payload of exactly PAYLOAD_BYTES bytes."""
    head = b'{"n":%d,"d":"' % k
    return (
        head
        + os.urandom(PAYLOAD_BYTES).hex().encode()[: PAYLOAD_BYTES - len(head) - 2]
        + b'"}'
    )


def measure(backend: str, tasks: int, directory: str) -> dict[str, Any]:
    """Fill and drain one queue in this process; returns the figures for ``backend``."""
    import psutil

    from fleet.queue.lease_queue import LeaseQueue
    from fleet.queue.storage import MemoryStorage, SqliteStorage
    from fleet.task import Item

    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    db = os.path.join(directory, "bench.sqlite3")
    storage = MemoryStorage() if backend == "memory" else SqliteStorage(db)
    q = LeaseQueue(tasks + 1, storage=storage)

    put_s = 0.0
    fill_started = time.time()
    for first in range(0, tasks, BATCH):
        now = time.time()
        batch = [
            Item(uuid.uuid4().hex, "work", 5, _payload(k), now)
            for k in range(first, min(first + BATCH, tasks))
        ]
        t = time.perf_counter()
        q.put(batch)
        put_s += time.perf_counter() - t
    del batch
    gc.collect()
    rss1 = proc.memory_info().rss
    held = len(q)
    disk = sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))

    ages = []
    t = time.perf_counter()
    drained = 0
    while len(q):
        got = q.lease(BATCH, "bench", 60.0, time.monotonic())
        q.ack([g.id for g in got])
        drained += len(got)
        if drained % (tasks // 20 or 1) < BATCH:
            ages.append(q.stats(time.time()).oldest_age_s)
    drain_s = time.perf_counter() - t
    q.close()
    out = {
        "tasks": tasks,
        "lost": tasks - min(held, drained),
        "bytes_per_pending_task": round((rss1 - rss0) / tasks, 1),
        "enqueue_per_s": round(tasks / put_s),
        "dequeue_per_s": round(drained / drain_s),
        "fill_s": round(time.time() - fill_started - drain_s, 2),
        "drain_s": round(drain_s, 2),
        "oldest_age_s": {
            "start": round(ages[0], 2),
            "half": round(ages[len(ages) // 2], 2),
            "max": round(max(ages), 2),
        },
    }
    if backend == "sqlite":
        out["disk_bytes_per_pending_task"] = round(disk / tasks, 1)
    return out


def _in_subprocess(backend: str, tasks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-queue-") as d:
        code = (
            "import json, sys; from fleet.bench.queue import measure; "
            f"print(json.dumps(measure({backend!r}, {tasks}, {d!r})))"
        )
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=3_600
        )
        if res.returncode != 0:
            raise RuntimeError(f"queue bench ({backend}) failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Any]:
    """Figures per backend for 1,000,000 pending tasks (50,000 with ``quick``)."""
    tasks = 50_000 if quick else 1_000_000
    backends = {b: _in_subprocess(b, tasks) for b in BACKENDS}
    return {
        "tasks": tasks,
        "payload_bytes": PAYLOAD_BYTES,
        "batch": BATCH,
        "target_bytes_per_pending_task": 1024,
        "backends": backends,
        "lost": sum(b["lost"] for b in backends.values()),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
