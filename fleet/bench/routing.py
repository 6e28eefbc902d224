"""Routing benchmark: round-robin, random, least-loaded (d=2) and full-scan routing of
the same arrivals over heterogeneous agents, at 70% and 90% load.

Where the choice happens: inside the host, per task (``AgentHost`` asks the pool's
router for each item). So the benchmark runs one host with many agents: the Serve
router has a single host to pick, and the dispatcher's batches (small: the queue is
shallow at these rates) only carry tasks to the host; they do not decide where a task
runs, nor, thanks to the hosts' progress reports, hold capacity for tasks that are
done. Each agent serves one task at a time and may hold ``concurrency_per_agent``
tasks (the rest wait at the agent, in order), so a router that sends work to a busy or
slow agent makes the task wait there. A fifth of the agents are ``SLOW_FACTOR`` times
slower.

The arrivals are a seeded Poisson process at a share of the agents' total service rate
(``capacity_tasks_per_s``), with per-task work drawn from the same generator: every
router sees exactly the same sequence. Latency is enqueue to ledger, from the ledger.

What to expect: round-robin and random ignore load, so a slow agent receives as much
as a fast one, fills to its bound and its tasks wait ``concurrency_per_agent`` x the
slow service time. Least-loaded with d=2 sends a task to a slow agent only when it
samples two agents and the slow one holds less work, or both are slow (about 4% of
tasks), so its tail is about one slow service time plus a short queue. The ratio of the
two tails therefore grows with the per-agent bound.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from fleet.agent import Agent
from fleet.agents.faulty import agent_index
from fleet.spec import parse_spec
from fleet.task import Task

AGENTS = 40
SLOW_EVERY = 5  # one agent in five is slow
SLOW_FACTOR = 5.0
SERVICE_S = 0.1  # a fast agent's mean time per task
CONCURRENCY = 16  # tasks an agent may hold (one runs, the rest wait at the agent)
ROUTERS = ("round_robin", "random", "least_loaded", "full_scan")
LOADS = (0.7, 0.9)
SEED = 20_240_601
TICK_S = 0.02


class HeteroAgent(Agent):
    """Serves one task at a time for ``service_s`` x the task's ``w``; every
    ``slow_every``-th agent (by slot index) is ``slow_factor`` times slower. Tasks sent
    while it is busy wait for it in arrival order."""

    capabilities = ("hetero",)

    def __init__(
        self,
        agent_id: str,
        service_s: float = SERVICE_S,
        slow_every: int = SLOW_EVERY,
        slow_factor: float = SLOW_FACTOR,
        **kwargs: Any,
    ):
        super().__init__(agent_id, **kwargs)
        slow = agent_index(agent_id) % slow_every == slow_every - 1
        self.service_s = service_s * (slow_factor if slow else 1.0)
        self._lock = asyncio.Lock()

    async def handle(self, task: Task) -> None:
        w = float((task.payload or {}).get("w", 1.0))
        async with self._lock:  # FIFO: asyncio.Lock wakes waiters in order
            await asyncio.sleep(self.service_s * w)


def capacity_tasks_per_s(agents: int = AGENTS) -> float:
    """Total service rate of the pool (tasks/s), the 100% load mark."""
    slow = sum(1 for i in range(agents) if i % SLOW_EVERY == SLOW_EVERY - 1)
    return (agents - slow) / SERVICE_S + slow / (SERVICE_S * SLOW_FACTOR)


def bench_spec(router: str, agents: int = AGENTS):
    return parse_spec(
        {
            "name": f"routing-{router.replace('_', '-')}",
            "namespace": "fleet-bench-routing",
            # Default batching: the queue is shallow at these rates, so batches are small,
            # and hosts report the progress of long batches so that a task stuck behind a
            # slow agent does not hold its whole batch's capacity in the dispatcher.
            "queues": {"shards": 1, "storage": {"backend": "memory"}},
            "pools": [
                {
                    "name": "hetero",
                    "capability": "hetero",
                    "agent_class": "fleet.bench.routing:HeteroAgent",
                    "agents_per_host": agents,
                    "concurrency_per_agent": CONCURRENCY,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": agents, "max_agents": agents},
                    "routing": {"router": router, "choices_d": 2},
                }
            ],
        }
    )


def arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[tuple[float, float]]:
    """(offset s, work factor) of a Poisson arrival sequence; the same seed gives the
    same sequence."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return out
        out.append((t, rng.uniform(0.8, 1.2)))


def _play(fc: Any, seq: list[tuple[float, float]]) -> dict[str, Any]:
    """Submit ``seq`` open loop (due arrivals every ``TICK_S``) and measure it."""
    items, _ = fc.validate(
        {"capability": "hetero", "payload": {"w": round(w, 4)}} for _, w in seq
    )
    t0 = time.monotonic()
    k = 0
    while k < len(items):
        now = time.monotonic() - t0
        j = k
        while j < len(items) and seq[j][0] <= now:
            j += 1
        if j > k:
            fc.submit_items(items[k:j])
            k = j
        if k < len(items):
            wait = seq[k][0] - (time.monotonic() - t0)
            if wait > 0:
                time.sleep(min(TICK_S, wait))
    offered = len(items) / max(seq[-1][0], 1e-9) if seq else 0.0
    ids = [it.id for it in items]
    missing = fc.wait(ids, timeout_s=300)
    s = fc.summary(ids)
    span = s["last_finish_unix_s"] - s["first_submit_unix_s"]
    results = [r for r in fc.results(ids) if r is not None]
    on_slow = sum(
        1
        for r in results
        if r.agent_id and agent_index(r.agent_id) % SLOW_EVERY == SLOW_EVERY - 1
    )
    last_submit = max((r.submitted_unix_s for r in results), default=0.0)
    return {
        "tasks": len(ids),
        "offered_per_s": round(offered, 1),
        # completed / (first enqueue .. last outcome): a long tail lowers it
        "throughput_tasks_per_s": round(s["completed"] / span, 1) if span > 0 else 0.0,
        "drain_s": round(max(0.0, s["last_finish_unix_s"] - last_submit), 2),
        "latency_s": {k: round(v, 4) for k, v in s["latency_s"].items()},
        "on_slow_agents": round(on_slow / max(1, len(ids)), 4),
        "failed": s["failed"],
        "lost": len(missing),
    }


def run(quick: bool = False) -> dict[str, Any]:
    from fleet.runtime.client import FleetClient

    duration_s = 8.0 if quick else 20.0
    cap = capacity_tasks_per_s()
    results: dict[str, dict[str, Any]] = {}
    for router in ROUTERS:
        fc = FleetClient.start(bench_spec(router))
        try:
            _play(fc, arrivals(0.5 * cap, 2.0, SEED - 1))  # warm up: agents, handles
            results[router] = {
                f"load_{round(load * 100)}": _play(
                    fc, arrivals(load * cap, duration_s, SEED + round(load * 100))
                )
                for load in LOADS
            }
        finally:
            fc.shutdown()
    rr = results["round_robin"]["load_90"]["latency_s"]["p99"]
    ll = results["least_loaded"]["load_90"]["latency_s"]["p99"]
    return {
        "agents": AGENTS,
        "slow_agents_share": 1 / SLOW_EVERY,
        "slow_factor": SLOW_FACTOR,
        "service_s": SERVICE_S,
        "concurrency_per_agent": CONCURRENCY,
        "hosts": 1,
        "choices_d": 2,
        "duration_s": duration_s,
        "capacity_tasks_per_s": round(cap, 1),
        "results": results,
        "p99_improvement_vs_round_robin": round(rr / ll, 2) if ll > 0 else None,
        "lost": sum(r["lost"] for by in results.values() for r in by.values()),
    }
