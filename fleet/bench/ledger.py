"""Ledger benchmark: the memory of one durable ledger shard holding a million outcomes.

One ``Ledger`` actor (SQLite in a fresh temporary directory, removed at the end) on a
local Ray cluster. Its process's memory is read with psutil on the pid Ray's GCS
reports (``actor_states``): RSS, and USS (the pages only it holds: RSS also counts
shared pages it has touched, such as Ray's object store).

1. ``restart_empty_s``: the shard is restarted once while empty
   (``ray.kill(no_restart=False)``), from the kill until Ray reports it ALIVE and a
   ``count()`` answers: the cost of a restart without any index to rebuild;
2. ``rss_idle_mib``: the restarted, empty shard's memory;
3. ``outcomes`` (1,000,000; ``--tasks N`` to change, ``--quick`` 100,000) realistic
   outcomes are recorded, each with a 32-character id and a 100-byte JSON output, in
   batches of 256 (as hosts send them) from 4 caller actors with one call in flight
   each; ``record_per_s`` is outcomes over the whole span, ``record_per_ledger_cpu_s``
   outcomes per second of the shard's own CPU time (less sensitive to the machine's
   load), ``rss_peak_mib`` the largest RSS sampled every 0.25 s during it;
4. ``rss_growth_mib``: RSS after recording minus idle (target <= 200 MiB), with the
   index's own bytes and the file sizes (database, WAL);
5. latency from the driver (Ray call included; median of 5): ``missing()`` of 30,000
   recorded ids (each hit is confirmed against its row), of 30,000 ids never recorded
   (index only), and ``get()`` of 1,000 recorded ids;
6. ``index_rebuild_s``: opening the file in a fresh store in another process (the scan
   a restarted shard does), with that process's memory growth while it ran;
7. the shard restarted at full size: ``restart_s``, its RSS then, and whether every
   outcome is still there (``lost``: recorded outcomes the restarted shard lacks,
   counted over the whole ledger and checked on a 30,000-id sample).

Figures only: nothing is asserted here.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from fleet.stats import median
from fleet.task import Outcome

FULL_OUTCOMES = 1_000_000
QUICK_OUTCOMES = 100_000
BATCH = 256
CALLERS = 4
OUTPUT_BYTES = 100
MISSING_IDS = 30_000
GET_IDS = 1_000
REPEATS = 5
TARGET_GROWTH_MIB = 200
RSS_SAMPLE_S = 0.25
ALIVE_TIMEOUT_S = 300.0
FLEET = "ledger-bench"
NAMESPACE = "fleet-bench-ledger"
MIB = 1024 * 1024


def task_id(k: int) -> str:
    """Outcome ``k``'s id: 32 hex characters, random-looking (as fleet's uuid4 ids) and
    reproducible, so the driver can look up what the callers recorded."""
    return hashlib.blake2b(k.to_bytes(8, "little"), digest_size=16).hexdigest()


def output(k: int) -> bytes:
    """A distinct JSON output of exactly ``OUTPUT_BYTES`` bytes."""
    head = b'{"n":%d,"answer":"' % k
    body = hashlib.blake2b(head, digest_size=64).hexdigest().encode()
    return head + body[: OUTPUT_BYTES - len(head) - 2] + b'"}'


def outcome(k: int, now: float) -> Outcome:
    """A completed task's outcome as a host records it."""
    return Outcome(
        task_id(k),
        True,
        output(k),
        None,
        None,
        f"hosts-work#{k % 4}/agent-{k % 500}",
        "work",
        1,
        now - 0.5,
        now - 0.2,
        now,
        1200,
        300,
        0.0021,
    )


@ray.remote(num_cpus=0)
class _Caller:
    """Records a range of outcomes in batches, one call in flight, as a host does."""

    def __init__(self, fleet: str, namespace: str):
        from fleet.runtime.ledger import LedgerClient

        self._ledger = LedgerClient(fleet, namespace, 1)

    def record(self, start: int, stop: int, batch: int) -> int:
        new = 0
        for first in range(start, stop, batch):
            now = time.time()
            new += self._ledger.record(
                [outcome(k, now) for k in range(first, min(first + batch, stop))]
            )
        return new


@ray.remote(num_cpus=0, max_calls=1)
def _rebuild(path: str) -> dict[str, Any]:
    """Open a ledger file as a restarted shard does; the time and this process's peak
    memory growth while it scanned."""
    import psutil

    from fleet.ledger.store import SqliteLedgerStore

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = [rss0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t = time.perf_counter()
    store = SqliteLedgerStore(path)
    took = time.perf_counter() - t
    done.set()
    watcher.join()
    rss1 = proc.memory_info().rss
    out = {
        "index_rebuild_s": round(took, 2),
        "outcomes": store.count(),
        "index_mib": round(store.index_bytes() / MIB, 1),
        "rebuild_peak_growth_mib": round((max(peak[0], rss1) - rss0) / MIB, 1),
        "rebuild_kept_growth_mib": round((rss1 - rss0) / MIB, 1),
    }
    store.close()
    return out


def _memory(pid: int) -> dict[str, float]:
    import psutil

    full = psutil.Process(pid).memory_full_info()
    return {"rss": full.rss / MIB, "uss": full.uss / MIB}


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _state(name: str) -> dict[str, Any]:
    from fleet.runtime.lifecycle import actor_states

    return actor_states(NAMESPACE, [name])[name]


def restart(handle: Any, name: str, clock: Callable[[], float] = time.monotonic) -> float:
    """Kill the shard for Ray to restart it; seconds until it is ALIVE again and a
    ``count()`` answers."""
    from fleet.runtime.lifecycle import ALIVE

    restarts = _state(name)["restarts"]
    ray.kill(handle, no_restart=False)
    t = clock()
    deadline = t + ALIVE_TIMEOUT_S
    while True:
        st = _state(name)
        if st["state"] == ALIVE and st["restarts"] > restarts:
            break
        if clock() > deadline:
            raise TimeoutError(f"{name} not ALIVE {ALIVE_TIMEOUT_S:g} s after a restart: {st}")
        time.sleep(0.02)
    ray.get(handle.count.remote())
    return clock() - t


def _median_s(call: Callable[[], Any]) -> float:
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return median(times)


def _files(path: Path) -> dict[str, int]:
    """Sizes of the ledger file ``path`` and its WAL and shared-memory files."""
    return {p.name: p.stat().st_size for p in sorted(path.parent.glob(f"{path.name}*"))}


def run(quick: bool = False, tasks: int | None = None) -> dict[str, Any]:
    """Memory, throughput and lookup latency of one ledger shard at ``tasks`` outcomes
    (default 1,000,000; 100,000 quick)."""
    from fleet.ledger.store import ledger_path
    from fleet.queue.storage import fleet_directory
    from fleet.runtime.ledger import Ledger
    from fleet.runtime.lifecycle import control_actor_options
    from fleet.runtime.names import Names
    from fleet.spec import parse_spec

    n = tasks or (QUICK_OUTCOMES if quick else FULL_OUTCOMES)
    directory = Path(tempfile.mkdtemp(prefix="fleet-bench-ledger-"))
    spec = parse_spec(
        {
            "name": FLEET,
            "namespace": NAMESPACE,
            "queues": {"storage": {"directory": str(directory)}},
            "pools": [
                {
                    "name": "work",
                    "capability": "work",
                    "agent_class": "fleet.agents.examples:NoopAgent",
                }
            ],
        }
    )
    name = Names(FLEET).ledger_shard(0)
    path = ledger_path(fleet_directory(spec.queues.storage, NAMESPACE, FLEET), 0)
    ledger = Ledger.options(**control_actor_options(name, NAMESPACE, detached=False)).remote(
        spec.model_dump(mode="json"), 0
    )
    callers: list[Any] = []
    try:
        ray.get(ledger.count.remote())
        restart_empty_s = restart(ledger, name)
        pid = _state(name)["pid"]
        idle = _memory(pid)

        callers = [_Caller.remote(FLEET, NAMESPACE) for _ in range(CALLERS)]
        ray.get([c.__ray_ready__.remote() for c in callers])
        peak = [idle["rss"]]
        done = threading.Event()

        def watch() -> None:
            import psutil

            proc = psutil.Process(pid)
            while not done.wait(RSS_SAMPLE_S):
                peak[0] = max(peak[0], proc.memory_info().rss / MIB)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        bounds = [n * i // CALLERS for i in range(CALLERS + 1)]
        cpu0 = _cpu_s(pid)
        t = time.perf_counter()
        new = sum(
            ray.get(
                [c.record.remote(a, b, BATCH) for c, a, b in zip(callers, bounds, bounds[1:])]
            )
        )
        record_s = time.perf_counter() - t
        record_cpu_s = _cpu_s(pid) - cpu0
        done.set()
        watcher.join()
        time.sleep(1.0)  # let the last batch's buffers go before reading the figure
        full = _memory(pid)
        stats = ray.get(ledger.stats.remote())
        files = _files(path)

        rng = random.Random(7)
        recorded_ids = [task_id(k) for k in rng.sample(range(n), min(MISSING_IDS, n))]
        absent_ids = [task_id(n + k) for k in range(MISSING_IDS)]
        get_ids = recorded_ids[:GET_IDS]
        missing_recorded_s = _median_s(lambda: ray.get(ledger.missing.remote(recorded_ids)))
        missing_absent_s = _median_s(lambda: ray.get(ledger.missing.remote(absent_ids)))
        get_s = _median_s(lambda: ray.get(ledger.get.remote(get_ids)))

        rebuild = ray.get(_rebuild.remote(str(path)))
        restart_s = restart(ledger, name)
        pid_after = _state(name)["pid"]
        after = _memory(pid_after)
        count_after = ray.get(ledger.count.remote())
        sample_lost = len(ray.get(ledger.missing.remote(recorded_ids)))
    finally:
        for c in callers:
            ray.kill(c)
        ray.kill(ledger, no_restart=True)
        shutil.rmtree(directory, ignore_errors=True)

    growth = full["rss"] - idle["rss"]
    return {
        "outcomes": n,
        "recorded": new,
        "batch": BATCH,
        "callers": CALLERS,
        "output_bytes": OUTPUT_BYTES,
        "record_per_s": round(n / record_s),
        "record_s": round(record_s, 1),
        # The shard's own CPU time while recording: outcomes per CPU-second of the
        # ledger process reads less of the machine's load than outcomes/s.
        "record_ledger_cpu_s": round(record_cpu_s, 1),
        "record_per_ledger_cpu_s": round(n / record_cpu_s) if record_cpu_s > 0 else None,
        "rss_idle_mib": round(idle["rss"], 1),
        "rss_full_mib": round(full["rss"], 1),
        "rss_peak_mib": round(peak[0], 1),
        "rss_growth_mib": round(growth, 1),
        "uss_growth_mib": round(full["uss"] - idle["uss"], 1),
        "rss_growth_bytes_per_outcome": round(growth * MIB / n, 1),
        "target_growth_mib": TARGET_GROWTH_MIB,
        "index_mib": round(stats["index_bytes"] / MIB, 1),
        "files_bytes": files,
        "disk_bytes_per_outcome": round(sum(files.values()) / n, 1),
        "missing_30k_recorded_ms": round(missing_recorded_s * 1000, 1),
        "missing_30k_absent_ms": round(missing_absent_s * 1000, 1),
        "get_1k_ms": round(get_s * 1000, 1),
        "restart_empty_s": round(restart_empty_s, 2),
        "restart_s": round(restart_s, 2),
        **rebuild,
        "rss_after_restart_mib": round(after["rss"], 1),
        "rss_growth_after_restart_mib": round(after["rss"] - idle["rss"], 1),
        "uss_growth_after_restart_mib": round(after["uss"] - idle["uss"], 1),
        "restarted": pid_after != pid,
        "lost": (n - count_after) + sample_lost,
    }
