"""Recording benchmark: how long after a task finishes its outcome is in the ledger.

One fleet on the durable defaults (SQLite queues and ledger, in a fresh temporary
directory removed at the end) with one pool of ``AGENTS`` (200) sleeping agents
(``fleet.agents.testing:SleepAgent``, one task at a time each, no CPU reserved).
``tasks`` tasks (2,000; ``--tasks N`` to change, ``--quick`` 500) sleep for a duration
drawn uniformly from ``SLEEP_S`` (0.05 to 1.0 s) by a seeded RNG (``SEED``), and are
submitted in bursts every ``SUBMIT_TICK_S`` (1 s) spread over ``SUBMIT_S`` (10 s) from a
background thread, so that each burst goes out in batches that mix short and long tasks
(the case where recording per batch waits for the slowest batch-mate) while agents stay
mostly idle (about half of them busy at the default size: tasks do not wait for an
agent, see ``queued_s``).

Meanwhile the driver polls the ledger every ``POLL_S`` (20 ms) with
``LedgerClient.cursors()``/``since()`` and notes the wall-clock time each id is first
seen (when the poll that returned it answered). At the end every outcome's
``finished_unix_s`` is read with ``FleetClient.results()``; the figure is
``finish_to_recorded_s``: seen minus finished (p50, p95, p99, max, and min as a check
of the clocks: hosts and driver share the machine's clock). It is late by up to one
poll period plus one poll call (``resolution_s``), never early.

Only APIs that also exist in commit 7e3bb36 are used, so this file can be run against
that runtime for a before/after comparison.

Figures only: nothing is asserted here.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from typing import Any

from fleet.bench.durability import _Background
from fleet.spec import FleetSpec, parse_spec
from fleet.stats import percentiles

FULL_TASKS = 2_000
QUICK_TASKS = 500
AGENTS = 200
AGENTS_PER_HOST = 100
POOL = "sleep"
SLEEP_S = (0.05, 1.0)
SEED = 20240611
SUBMIT_S = 10.0  # submissions are spread evenly over this
SUBMIT_TICK_S = 1.0  # each tick submits every task due by then: a burst
POLL_S = 0.02
TIMEOUT_S = 120.0  # after the last submission, for every outcome to be recorded
RESULTS_CHUNK = 5_000


def bench_spec(directory: str, agents: int = AGENTS) -> FleetSpec:
    """The benchmark fleet: durable defaults in ``directory``, ``agents`` sleeping agents."""
    return parse_spec(
        {
            "name": "recording-bench",
            "namespace": "fleet-bench-recording",
            "queues": {"storage": {"directory": directory}},
            "pools": [
                {
                    "name": POOL,
                    "capability": POOL,
                    "agent_class": "fleet.agents.testing:SleepAgent",
                    "agents_per_host": min(agents, AGENTS_PER_HOST),
                    "concurrency_per_agent": 1,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": agents, "max_agents": agents},
                }
            ],
        }
    )


def durations(n: int, low: float, high: float, seed: int = SEED) -> list[float]:
    """Each task's sleep, uniform in [low, high], reproducible from ``seed``."""
    rng = random.Random(seed)
    return [rng.uniform(low, high) for _ in range(n)]


def _submit_steadily(fc: Any, items: list[Any], generated: set[str], span_s: float) -> None:
    """Submit ``items`` evenly over ``span_s``: every tick, all those due by then."""
    rate = len(items) / span_s if span_s > 0 else float("inf")
    t0 = time.monotonic()
    k = 0
    while k < len(items):
        due = min(len(items), int((time.monotonic() - t0) * rate) + 1)
        if due > k:
            fc.submit_items(items[k:due], generated=generated)
            k = due
        time.sleep(SUBMIT_TICK_S)


def _figures(values: list[float]) -> dict[str, float]:
    out = {k: round(v, 4) for k, v in percentiles(values).items()}
    out["max"] = round(max(values), 4) if values else 0.0
    out["min"] = round(min(values), 4) if values else 0.0
    return out


def measure(
    fc: Any, n: int, sleep_s: tuple[float, float], seed: int, submit_s: float
) -> dict[str, Any]:
    """Submit ``n`` sleeping tasks over ``submit_s`` and poll the ledger until every one
    is recorded (or ``TIMEOUT_S`` after the last submission); the figures."""
    from fleet.ledger.store import SINCE_LIMIT

    tasks = [
        {"capability": POOL, "payload": {"sleep_s": d}}
        for d in durations(n, *sleep_s, seed=seed)
    ]
    items, report = fc.validate(tasks)
    assert not report.rejected, report.rejected[:3]
    ids = [it.id for it in items]
    waiting = set(ids)
    seen: dict[str, float] = {}
    ledger = fc.ledger
    cursors = ledger.cursors()  # before any submission: nothing recorded is missed
    loadavg = os.getloadavg()
    submitter = _Background(lambda: _submit_steadily(fc, items, report.generated, submit_s))
    started = time.monotonic()
    submitter.start()
    deadline = started + submit_s + TIMEOUT_S
    next_poll = started
    polls = 0
    while waiting and time.monotonic() < deadline and submitter.error is None:
        new, cursors = ledger.since(cursors)
        now = time.time()
        polls += 1
        for i in new:
            if i in waiting:
                waiting.discard(i)
                seen[i] = now
        if len(new) >= SINCE_LIMIT:
            continue  # more is waiting on some shard: read it at once
        next_poll += POLL_S
        pause = next_poll - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_poll = time.monotonic()  # late: keep the period, do not catch up
    wall_s = time.monotonic() - started
    submitter.join_raising(max(1.0, deadline - time.monotonic()))

    results = []
    for k in range(0, len(ids), RESULTS_CHUNK):
        results.extend(fc.results(ids[k : k + RESULTS_CHUNK]))
    lag, queued = [], []
    failed = 0
    for i, r in zip(ids, results):
        if r is None:
            continue
        failed += r.status.value != "completed"
        if r.started_unix_s is not None:
            queued.append(r.started_unix_s - r.submitted_unix_s)
        if i in seen:
            lag.append(seen[i] - r.finished_unix_s)
    return {
        "tasks": n,
        "recorded": len(lag),
        "lost": sum(r is None for r in results),
        "failed": failed,
        "finish_to_recorded_s": _figures(lag),
        "queued_s": _figures(queued),
        "polls": polls,
        "wall_s": round(wall_s, 2),
        "loadavg_at_submit": [round(x, 2) for x in loadavg],
    }


def run(
    quick: bool = False,
    tasks: int | None = None,
    *,
    max_sleep_s: float = SLEEP_S[1],
    min_sleep_s: float = SLEEP_S[0],
    submit_s: float = SUBMIT_S,
    agents: int = AGENTS,
    seed: int = SEED,
) -> dict[str, Any]:
    """``tasks`` sleeping tasks (default 2,000; 500 quick) on ``agents`` agents: latency
    from each task's finish to its outcome being seen in the ledger."""
    from fleet.runtime.client import FleetClient

    n = tasks or (QUICK_TASKS if quick else FULL_TASKS)
    loadavg = os.getloadavg()
    directory = tempfile.mkdtemp(prefix="fleet-bench-recording-")
    try:
        spec = bench_spec(os.path.join(directory, "fleet"), agents)
        t = time.monotonic()
        fc = FleetClient.start(spec)
        deploy_s = time.monotonic() - t
        try:
            figures = measure(fc, n, (min_sleep_s, max_sleep_s), seed, submit_s)
        finally:
            fc.shutdown()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "backend": spec.queues.storage.backend.value,
        "agents": agents,
        "concurrency_per_agent": 1,
        "seed": seed,
        "sleep_s": [min_sleep_s, max_sleep_s],
        "submit_s": submit_s,
        "rate_per_s": round(n / submit_s, 1) if submit_s > 0 else None,
        "poll_s": POLL_S,
        "resolution_s": POLL_S,
        "loadavg_at_start": [round(x, 2) for x in loadavg],
        "deploy_s": round(deploy_s, 2),
        **figures,
    }
