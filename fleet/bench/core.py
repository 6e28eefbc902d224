"""Core benchmark: Ray's raw async actor-call rate against fleet's end-to-end rate.

Both are measured in the same run on the same cluster. Fleet's figure is queue to
ledger for no-op tasks on 1,000 logical agents: from the first submit to the last
recorded outcome, taken from the ledger's own timestamps. Latency is then measured
open-loop at 80% of that saturating rate.

The headline runs on the durable defaults (SQLite queues and the durable SQLite ledger,
in a temporary directory removed afterwards), the way a fleet runs unless told
otherwise; the same measurement on the memory backend runs beside it (``memory``), so
the cost of durability is read off one run.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

import ray

from fleet.spec import parse_spec

RAY_CALLS = 20_000
RAY_WINDOW = 1_000


@ray.remote(num_cpus=0)
class _Echo:
    async def noop(self) -> None:
        return None


@ray.remote(num_cpus=0)
class _Caller:
    """Drives the echo actor from inside Ray, as fleet's dispatcher drives its pools."""

    async def drive(self, target: Any, calls: int, window: int) -> float:
        t0 = time.perf_counter()
        done = 0
        while done < calls:
            n = min(window, calls - done)
            await asyncio.gather(*(target.noop.remote() for _ in range(n)))
            done += n
        return calls / (time.perf_counter() - t0)


def ray_actor_calls_per_s(calls: int = RAY_CALLS) -> float:
    echo, caller = _Echo.remote(), _Caller.remote()
    try:
        ray.get(caller.drive.remote(echo, 1_000, RAY_WINDOW))  # warm up
        return ray.get(caller.drive.remote(echo, calls, RAY_WINDOW))
    finally:
        ray.kill(echo)
        ray.kill(caller)


def bench_spec(
    agents: int = 1_000, storage: dict[str, Any] | None = None, admission: bool = False
):
    """``storage``: the queues' storage section (it picks the ledger's too); memory
    unless given. ``admission``: admission control on, with a limit no task reaches
    (what it costs, not what it refuses)."""
    return parse_spec(
        {
            "name": "bench",
            "namespace": "fleet-bench",
            "queues": {
                "shards": 2,
                "batch": {"max_items": 512},
                "storage": storage or {"backend": "memory"},
            },
            "pools": [
                {
                    "name": "noop",
                    "capability": "noop",
                    "agent_class": "fleet.agents.examples:NoopAgent",
                    "agents_per_host": agents // 2,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": agents, "max_agents": agents},
                    "admission": {"enabled": admission, "max_queue_wait_s": 86_400},
                }
            ],
        }
    )


def _submit(fc: Any, items: list[Any], generated: set[str]) -> None:
    """Queue validated items, through admission control when the pool has it (as
    ``FleetClient.submit`` does); nothing is refused at the bench's limit."""
    if fc.spec.pools[0].admission.enabled:
        items, refused = fc.admit(items)
        if refused:
            raise RuntimeError(f"{len(refused)} tasks refused by admission control")
    fc.submit_items(items, generated=generated)


def _fleet_throughput(fc: Any, n: int) -> dict[str, Any]:
    items, rep = fc.validate({"capability": "noop", "payload": i} for i in range(n))
    _submit(fc, items, rep.generated)  # latency and span count from enqueue
    ids = [it.id for it in items]
    missing = fc.wait(ids, timeout_s=300)
    s = fc.summary(ids)
    span = s["last_finish_unix_s"] - s["first_submit_unix_s"]
    return {
        "tasks": n,
        "lost": len(missing),
        "completed": s["completed"],
        "tasks_per_s": n / span if span > 0 else 0.0,
        "latency_s": s["latency_s"],
    }


def _open_loop(fc: Any, rate_per_s: float, duration_s: float) -> dict[str, Any]:
    """Submit at a fixed rate and measure latency from the ledger.

    Open loop: every 10 ms tick submits everything due by then, so a submit call that
    takes longer than a tick (a durable put commits before it returns) makes the next
    one larger instead of lowering the offered rate."""
    tick = 0.01
    # Validate up front, as a client would in its own process: the generator must not
    # take CPU from the fleet it measures (latency counts from enqueue).
    pool, rep = fc.validate(
        {"capability": "noop", "payload": k} for k in range(int(rate_per_s * duration_s) + 1)
    )
    ids: list[str] = []
    t0 = time.monotonic()
    k = 0
    while k < len(pool):
        elapsed = time.monotonic() - t0
        due = min(len(pool), int(elapsed * rate_per_s) + 1)
        if due > k:
            items = pool[k:due]
            k = due
            _submit(fc, items, rep.generated)
            ids.extend(it.id for it in items)
        sleep = t0 + (int(elapsed / tick) + 1) * tick - time.monotonic()
        if sleep > 0:
            time.sleep(sleep)
    offered = len(ids) / (time.monotonic() - t0)
    missing = fc.wait(ids, timeout_s=120)
    s = fc.summary(ids)
    return {
        "offered_per_s": round(offered, 1),
        "tasks": len(ids),
        "lost": len(missing),
        "latency_s": s["latency_s"],
    }


def _measure(
    storage: dict[str, Any], quick: bool, raw: float, admission: bool = False
) -> dict[str, Any]:
    from fleet.runtime.client import FleetClient

    n = 20_000 if quick else 100_000
    fc = FleetClient.start(bench_spec(storage=storage, admission=admission))
    try:
        _fleet_throughput(fc, 5_000)  # warm up hosts, router and caches
        sat = _fleet_throughput(fc, n)
        loaded = _open_loop(fc, 0.8 * sat["tasks_per_s"], 3.0 if quick else 10.0)
    finally:
        fc.shutdown()
    return {
        "fleet_tasks_per_s": round(sat["tasks_per_s"], 1),
        "ratio": round(sat["tasks_per_s"] / raw, 2),
        "p95_s": round(loaded["latency_s"]["p95"], 4),
        "saturated": sat,
        "at_80_percent": loaded,
        "storage": fc.spec.queues.storage.backend.value,
        "admission": admission,
        "lost": sat["lost"] + loaded["lost"],
    }


def run(
    quick: bool = False, storage: dict[str, Any] | None = None, admission: bool = False
) -> dict[str, Any]:
    """The durable defaults (SQLite queues and ledger), then memory beside them; with
    ``storage``, only that storage section. ``admission``: the pool with admission
    control on, every submission through it (``fleet bench core --admission``)."""
    raw = ray_actor_calls_per_s(5_000 if quick else RAY_CALLS)
    if storage is not None:
        return {
            "ray_actor_calls_per_s": round(raw, 1),
            "agents": 1_000,
            **_measure(storage, quick, raw, admission),
        }
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as d:
        durable = _measure({"backend": "sqlite", "directory": d}, quick, raw, admission)
    memory = _measure({"backend": "memory"}, quick, raw, admission)
    return {
        "ray_actor_calls_per_s": round(raw, 1),
        "agents": 1_000,
        **durable,
        "memory": memory,
        "lost": durable["lost"] + memory["lost"],
    }
