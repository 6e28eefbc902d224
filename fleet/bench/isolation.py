"""``fleet bench isolation``: what bulkheads and preemption buy (issue 19).

- **Bulkheads.** A pool of 20 agents of 50 ms (400 tasks/s). A victim tenant sends
  ``VICTIM_RATE`` tasks/s; its latency p50/p99 alone, then beside a flooding tenant
  that sends ``FLOOD_RATE`` tasks/s (ten times its queued limit every second), with
  ``bulkheads.tenant`` on and, in a second fleet, off. Reported: the victim's latency
  ratio under the flood (flooded p99 / alone p99) with and without bulkheads, what of
  the flood was accepted and refused, and the most of its tasks that ran at once.
- **Preemption.** A pool of 4 agents busy with 2 s low-priority tasks; urgent tasks
  arrive one at a time; reported: how long each waited to start, against
  ``preempt_after_s`` plus the dispatcher's check period.

All on loopback, bounded in time and count.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

from fleet.stats import most_at_once, percentile

NEEDS_RAY = True
SERVICE_S = 0.05
AGENTS = 20
VICTIM_RATE = 50.0
FLOOD_RATE = 1_000.0
PHASE_S = 15.0
QUICK_PHASE_S = 5.0
FLOOD_QUEUED, FLOOD_IN_FLIGHT = 100, 10
LOW_S = 2.0
PREEMPT_AFTER_S = 0.5
URGENT = 5
SETTLE_TIMEOUT_S = 120.0


def _pool(name: str, agents: int, delay_s: float, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "capability": name,
        "agent_class": "fleet.agents.testing:SleepAgent",
        "agent_kwargs": {"delay_s": delay_s},
        "agents_per_host": agents,
        "cpus_per_host": 0,
        "autoscaling": {"min_agents": agents, "max_agents": agents, "initial_agents": agents},
        **kw,
    }


def _spec(directory: str, name: str, **kw: Any) -> Any:
    from fleet.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "namespace": name,
            "queues": {"storage": {"directory": directory}, "discipline": "priority"},
            **kw,
        }
    )


def _sender(fc: Any, tenant: str, rate: float, stop_at: float, out: dict[str, list]) -> None:
    """Submit batches of 10 at ``rate`` tasks/s until ``stop_at``."""
    period = 10 / rate
    k = 0
    nxt = time.monotonic()
    while (now := time.monotonic()) < stop_at:
        if now < nxt:
            time.sleep(nxt - now)
        tasks = [{"capability": "work", "id": f"{tenant}-{k + j}"} for j in range(10)]
        k += 10
        report = fc.submit(tasks, tenant=tenant)
        out["accepted"] += report.accepted
        out["refused"] += [r.id for r in report.refused]
        nxt += period


def _latencies(fc: Any, ids: list[str]) -> dict[str, Any]:
    missing = fc.wait(ids, timeout_s=SETTLE_TIMEOUT_S)
    results = [r for r in fc.results(ids) if r is not None]
    lat = sorted(r.latency_s for r in results)
    p50, p99 = (percentile(lat, q) for q in (0.5, 0.99))
    return {
        "tasks": len(ids),
        "lost": len(missing),
        "failed": sum(1 for r in results if r.status.value != "completed"),
        "p50_s": None if p50 is None else round(p50, 3),
        "p99_s": None if p99 is None else round(p99, 3),
    }


def _phase(fc: Any, seconds: float, flood: bool) -> dict[str, Any]:
    stop_at = time.monotonic() + seconds
    victim: dict[str, list] = {"accepted": [], "refused": []}
    flooder: dict[str, list] = {"accepted": [], "refused": []}
    tag = "flooded" if flood else "alone"
    threads = [
        threading.Thread(
            target=_sender, args=(fc, f"victim-{tag}", VICTIM_RATE, stop_at, victim)
        )
    ]
    if flood:
        threads.append(
            threading.Thread(target=_sender, args=(fc, "flood", FLOOD_RATE, stop_at, flooder))
        )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {
        "victim": _latencies(fc, victim["accepted"]),
        "victim_refused": len(victim["refused"]),
    }
    if flood:
        fc.wait(flooder["accepted"], timeout_s=SETTLE_TIMEOUT_S)
        res = [r for r in fc.results(flooder["accepted"]) if r is not None]
        out["flood"] = {
            "offered": len(flooder["accepted"]) + len(flooder["refused"]),
            "accepted": len(flooder["accepted"]),
            "refused": len(flooder["refused"]),
            "lost": len(flooder["accepted"]) - len(res),
            "most_at_once": most_at_once(
                (r.started_unix_s, r.finished_unix_s) for r in res if r.started_unix_s
            ),
        }
    return out


def _bulkheads(directory: str, seconds: float) -> dict[str, Any]:
    from fleet.runtime.client import FleetClient

    limits = {"max_queued": FLOOD_QUEUED, "max_in_flight": FLOOD_IN_FLIGHT}
    out: dict[str, Any] = {}
    for mode, bulkheads in (("on", {"tenant": limits}), ("off", {})):
        spec = _spec(
            directory,
            f"bench-bulkhead-{mode}",
            pools=[_pool("work", AGENTS, SERVICE_S)],
            bulkheads=bulkheads,
        )
        fc = FleetClient.start(spec)
        try:
            alone = _phase(fc, seconds, flood=False)
            flooded = _phase(fc, seconds, flood=True)
        finally:
            fc.shutdown()
        p99 = alone["victim"]["p99_s"]
        out[mode] = {
            "alone": alone,
            "flooded": flooded,
            "victim_p99_ratio": round(flooded["victim"]["p99_s"] / p99, 2) if p99 else None,
        }
    return out


def _preemption(directory: str) -> dict[str, Any]:
    from fleet.runtime.client import FleetClient

    spec = _spec(
        directory,
        "bench-preempt",
        pools=[
            _pool(
                "work",
                4,
                LOW_S,
                preemption={"enabled": True, "preempt_after_s": PREEMPT_AFTER_S},
            )
        ],
        budgets={
            "priority_classes": [{"name": "urgent", "min_task_priority": 7}, {"name": "bulk"}]
        },
    )
    fc = FleetClient.start(spec)
    waits: list[float] = []
    try:
        low = fc.submit(
            [{"capability": "work", "id": f"low-{k}", "priority": 1} for k in range(40)]
        ).accepted
        time.sleep(LOW_S)  # the pool is full of low-priority work
        urgent = []
        for k in range(URGENT):
            (i,) = fc.submit(
                [
                    {
                        "capability": "work",
                        "id": f"urgent-{k}",
                        "priority": 9,
                        "payload": {"sleep_s": 0.01},
                    }
                ]
            ).accepted
            fc.wait([i], timeout_s=30)
            urgent.append(i)
        for r in fc.results(urgent):
            waits.append(r.started_unix_s - r.submitted_unix_s)
        missing = fc.wait(low, timeout_s=SETTLE_TIMEOUT_S)
        results = [r for r in fc.results(low) if r is not None]
        status = fc.status()["pools"]["work"]
    finally:
        fc.shutdown()
    return {
        "agents": 4,
        "low_task_s": LOW_S,
        "preempt_after_s": PREEMPT_AFTER_S,
        "urgent_start_s": [round(w, 3) for w in waits],
        "urgent_start_max_s": round(max(waits), 3),
        "preempted": status.get("preempted"),
        "low_failed": sum(1 for r in results if r.status.value != "completed"),
        "low_deliveries_max": max(r.deliveries for r in results),
        "lost": len(missing) + (len(low) - len(results)),
    }


def run(quick: bool = False) -> dict[str, Any]:
    loadavg = os.getloadavg()
    directory = tempfile.mkdtemp(prefix="fleet-bench-isolation-")
    try:
        bulk = _bulkheads(directory, QUICK_PHASE_S if quick else PHASE_S)
        pre = _preemption(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    lost = pre["lost"] + sum(
        m[p]["victim"]["lost"] + m[p].get("flood", {}).get("lost", 0)
        for m in bulk.values()
        for p in ("alone", "flooded")
    )
    return {
        "service_s": SERVICE_S,
        "agents": AGENTS,
        "victim_rate_per_s": VICTIM_RATE,
        "flood_rate_per_s": FLOOD_RATE,
        "flood_limits": {"max_queued": FLOOD_QUEUED, "max_in_flight": FLOOD_IN_FLIGHT},
        "bulkheads": bulk,
        "preemption": pre,
        "lost": lost,
        "loadavg_at_start": [round(x, 2) for x in loadavg],
    }
