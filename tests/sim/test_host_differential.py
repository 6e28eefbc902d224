"""One event trace, two drivers of the same HostCore: the simulator and the live host.

The trace: tasks arriving at fixed times on a pool of four agents, each task taking
exactly one second, every task on agent 0 failing (the simulator's bad agent, a live
agent that raises the same error). Retries hand failures back after a backoff (every
retried task then lands on a good agent); agent 0's breaker opens, turns half-open,
fails its probe, opens again. The simulator runs it on virtual
time; ``AgentHost`` runs it on a fake clock, with an agent whose one second is that
clock's and a test loop standing in for the dispatcher (it resubmits what the host
hands back, after the delay the host gave). Both cores record what they decided
(``HostCore.trace``): every placement, every outcome they learned from, every retry
decision. The two records must be identical, kind by kind and in order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from pathlib import Path
from typing import Any

from fleet.agent import Agent
from fleet.runtime.host import AgentHost
from fleet.sim import Simulation
from fleet.task import Item, to_item
from tests.utils import FakeClock, FakeLedger

from .helpers import pool_spec, scenario

SEED = 7
AGENTS = 4
RESILIENCE = {
    "task_timeout_s": 60.0,
    "retry": {"max_attempts": 3, "initial_backoff_s": 0.5, "jitter_ratio": 0.0},
    "agent_breaker": {
        "window_calls": 4,
        "min_calls": 2,
        "failure_rate_threshold": 0.5,
        "open_duration_s": 3.0,
        "max_open_duration_s": 3.0,
    },
}
# Health could take agent 0 out on its error rate: the simulator does not model that
# stage, so here it never trips (and beats are far apart).
HEALTH = {
    "error_min_calls": 1_000_000,
    "heartbeat_interval_s": 1_000.0,
    "heartbeat_timeout_s": 2_000.0,
}


def _arrivals(n: int = 40) -> list[float]:
    rng = random.Random(SEED)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.uniform(0.05, 0.6)  # no two events at the same time
        out.append(round(t, 6))
    return out


def _by_kind(trace: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for e in trace:
        out.setdefault(e[0], []).append(e)
    return out


def _pool(routing: str) -> dict[str, Any]:
    return pool_spec("work", AGENTS, routing={"router": routing})


# --- the simulator --------------------------------------------------------------------


def _simulated(routing: str, times: list[float], tmp_path: Path) -> list[tuple[Any, ...]]:
    path = tmp_path / "arrivals.txt"
    path.write_text("\n".join(map(str, times)))
    sc = scenario(
        pools=[_pool(routing)],
        models={
            "work": {
                "service": {"kind": "constant", "value_s": 1.0},
                # Agent 0 is the bad one (the first of the even spread).
                "failures": {"bad_agent_share": 0.2, "bad_agent_failure_prob": 1.0},
            }
        },
        workload=[{"pool": "work", "arrivals": {"kind": "trace", "path": str(path)}}],
        fleet={"resilience": RESILIENCE},
        max_tasks=len(times),
        seed=SEED,
    )
    sim = Simulation(sc, default_components=False)
    core = sim.pools[0].hosts[0].core
    core.trace = []
    sim.run()
    assert sim.report()["lost"] == 0
    assert [a.fail_p for a in core.agents] == [1.0, 0.0, 0.0, 0.0]
    return core.trace


# --- the live host on a fake clock ------------------------------------------------------


class _Loop:
    """The test's event list on the fake clock: arrivals, ends of agent work."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.heap: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()

    def at(self, t: float, kind: str, what: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, what))

    async def work(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.at(self.clock() + seconds, "wake", fut)
        await fut


LOOP: _Loop | None = None


class TraceAgent(Agent):
    """One second of the fake clock per task; agent 0 fails every task, with the
    simulator's error."""

    async def handle(self, task: Any) -> Any:
        assert LOOP is not None
        await LOOP.work(1.0)
        if self.agent_id.endswith("/0"):
            raise RuntimeError("simulated upstream error")
        return {"ok": True}


async def _settle() -> None:
    # Let every task that can run now run to its next await on the fake clock (no
    # real time passes; this is the event loop's turn, not a wait for a condition).
    for _ in range(200):
        await asyncio.sleep(0)


async def _live_async(routing: str, times: list[float]) -> list[tuple[Any, ...]]:
    global LOOP
    clock = FakeClock(0.0)
    LOOP = loop = _Loop(clock)
    spec = _pool(routing)
    spec["agent_class"] = f"{__name__}:TraceAgent"
    host = AgentHost(
        spec,
        RESILIENCE,
        health=HEALTH,
        clock=clock,
        rng=random.Random(f"fleet-sim/{SEED}/route/work/h0"),  # the simulated host's
        autotick=False,  # no tick on real time: the simulator does not tick either
    )
    host.recorder.client = FakeLedger()
    host.core.trace = []
    running: set[asyncio.Task[Any]] = set()

    def submit(item: Item) -> None:
        t = asyncio.get_running_loop().create_task(host.run_and_record([item]))
        running.add(t)

        def done(task: asyncio.Task[Any], item: Item = item) -> None:
            running.discard(task)
            report = task.result()
            for _, delay in zip(report.retry_ids, report.retry_delays_s):
                # The dispatcher gives it back to the queue after the delay: delivered
                # again, one delivery more.
                loop.at(
                    clock() + delay, "arrive", item._replace(deliveries=item.deliveries + 1)
                )

        t.add_done_callback(done)

    for k, t in enumerate(times):
        item = to_item({"capability": "work", "payload": {"k": k}}, {"work"})
        loop.at(t, "arrive", item._replace(deliveries=1))
    while loop.heap:
        t, _, kind, what = heapq.heappop(loop.heap)
        clock.t = t
        if kind == "wake":
            what.set_result(None)
        else:
            submit(what)
        await _settle()
    # Final outcomes go out after the record buffer's few real milliseconds.
    await asyncio.wait_for(asyncio.gather(*running), 30.0)
    return host.core.trace


def test_the_simulator_and_the_live_host_drive_the_core_identically(tmp_path):
    times = _arrivals()
    for routing in ("round_robin", "least_loaded"):
        simulated = _by_kind(_simulated(routing, times, tmp_path))
        live = _by_kind(asyncio.run(_live_async(routing, times)))
        assert set(simulated) == {"place", "finish", "retry"}, routing
        for kind in ("place", "finish", "retry"):
            assert live[kind] == simulated[kind], (routing, kind)
        # The trace exercises what it claims: failures retried, a breaker that held
        # agent 0 out for a while, work on every agent.
        retried = [r for r in simulated["retry"] if r[1] is not None]
        assert len(retried) >= 4 and len(retried) == len(simulated["retry"])
        placed = [p[1] for p in simulated["place"]]
        assert set(placed) == set(range(AGENTS))
        fair = len(placed) / AGENTS
        assert placed.count(0) < fair / 2, "the open breaker kept agent 0 from its share"
