"""Controller: the control loop. Reads queue depth and in-flight work, runs the pure
autoscaling policy per pool, and tells the dispatcher (logical agents) and Serve, via
the hosts' ``desired_hosts`` metric, how much capacity to run. It keeps a timeline of
every decision for ``fleet status`` and the autoscaling trace.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import ray
from ray import serve

from fleet.policy.autoscaling import ScalingInput, ScalingState, decide
from fleet.runtime.names import Names
from fleet.spec.fleet import FleetSpec

TIMELINE_MAX_SAMPLES = 100_000


@ray.remote(num_cpus=0)
class Controller:
    def __init__(self, spec: dict[str, Any]):
        self.spec = FleetSpec.model_validate(spec)
        self.names = Names(self.spec.name)
        ns = self.spec.namespace
        self._shards = {
            p.capability: [ray.get_actor(self.names.shard(p.capability, i), namespace=ns)
                           for i in range(self.spec.queues.shards)]
            for p in self.spec.pools
        }
        self._agents = {p.name: p.autoscaling.start_agents for p in self.spec.pools}
        self._state: dict[str, ScalingState] = {p.name: ScalingState() for p in self.spec.pools}
        self._last_enqueued: dict[str, tuple[float, int]] = {}
        self._timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE_MAX_SAMPLES)
        self._last: dict[str, dict[str, Any]] = {}
        self._dispatcher = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    async def start(self) -> None:
        if self._task is None:
            self._dispatcher = ray.get_actor(self.names.dispatcher, namespace=self.spec.namespace)
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        interval = min(p.autoscaling.control_interval_s for p in self.spec.pools)
        while True:
            try:
                await self.tick()
            except Exception as exc:  # a failed tick must not stop the loop
                self._last["_error"] = {"error": repr(exc), "t": time.time()}
            await asyncio.sleep(interval)

    def _running_hosts(self) -> dict[str, int]:
        try:
            st = serve.status()
        except Exception:
            return {}
        out = {}
        for p in self.spec.pools:
            app = st.applications.get(self.names.pool_app(p.name))
            dep = app.deployments.get(Names.host_deployment(p.name)) if app else None
            if dep is not None:
                out[p.name] = int(dep.replica_states.get("RUNNING", 0))
        return out

    async def tick(self) -> list[dict[str, Any]]:
        """One control step for every pool; returns the samples it recorded."""
        now = time.monotonic()
        wall = time.time()
        queue_stats = {
            cap: await asyncio.gather(*(s.stats.remote() for s in shards),
                                      return_exceptions=True)
            for cap, shards in self._shards.items()
        }
        disp = await self._dispatcher.stats.remote()
        # serve.status() blocks on Serve's controller: keep it off this actor's loop.
        hosts = await asyncio.get_running_loop().run_in_executor(None, self._running_hosts)
        samples = []
        for p in self.spec.pools:
            stats = [s for s in queue_stats[p.capability] if isinstance(s, dict)]
            known = len(stats) == len(queue_stats[p.capability])
            depth = sum(s["depth"] for s in stats)
            in_flight = disp.get(p.name, {}).get("in_flight", 0)
            decision, self._state[p.name] = decide(
                p.autoscaling,
                ScalingInput(now, self._agents[p.name], depth if known else None, in_flight),
                self._state[p.name],
            )
            self._agents[p.name] = decision.agents
            running = hosts.get(p.name) or p.hosts_for(decision.agents)
            await self._dispatcher.set_active.remote(p.name, decision.agents, running)
            enq = sum(s["enqueued_total"] for s in stats)
            t_prev, enq_prev = self._last_enqueued.get(p.name, (now, enq))
            rate = (enq - enq_prev) / (now - t_prev) if now > t_prev else 0.0
            self._last_enqueued[p.name] = (now, enq)
            sample = {
                "t_s": round(now - self._t0, 3), "unix_s": wall, "pool": p.name,
                "agents": decision.agents, "raw_desired": decision.raw_desired,
                "reason": decision.reason, "hosts": running,
                "desired_hosts": p.hosts_for(decision.agents),
                "queue_depth": depth, "in_flight": in_flight,
                "oldest_age_s": max((s["oldest_age_s"] for s in stats), default=0.0),
                "arrival_rate_per_s": round(rate, 2),
            }
            self._last[p.name] = sample
            self._timeline.append(sample)
            samples.append(sample)
        return samples

    async def desired_hosts(self, pool: str) -> int:
        p = next(p for p in self.spec.pools if p.name == pool)
        return p.hosts_for(self._agents[pool])

    async def agents(self) -> dict[str, int]:
        return dict(self._agents)

    async def timeline(self, since_t_s: float = 0.0) -> list[dict[str, Any]]:
        return [s for s in self._timeline if s["t_s"] >= since_t_s]

    async def status(self) -> dict[str, Any]:
        return {"pools": dict(self._last), "spec": self.spec.model_dump(mode="json")}
