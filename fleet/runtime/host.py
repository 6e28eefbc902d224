"""AgentHost: one Ray Serve replica running many logical agents of one pool.

A batch of items arrives in one call; each item runs on a logical agent with a free
slot (an agent has ``concurrency_per_agent`` slots). The host runs at most ``active``
agents: when the dispatcher lowers that number, the agents above it are *draining*:
they finish the task in hand and take no new one, and their slots are not handed out
again. A watchdog cancels any task past ``task_timeout_s`` and fails it with reason
``timeout``, so a hung agent cannot hold a slot forever.
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections import deque
from typing import Any

import orjson

from fleet.agent import Agent, Reply
from fleet.runtime.imports import import_object
from fleet.spec.budgets import ModelPrice
from fleet.spec.pools import PoolSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.task import Item, Outcome, failed_outcome, item_to_task

WATCHDOG_INTERVAL_S = 0.5
MAX_ERROR_CHARS = 2000


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (unit tests, local use)
        return uuid.uuid4().hex[:8]


class AgentHost:
    """The body of a pool's Serve deployment (see ``fleet.runtime.deploy``)."""

    def __init__(self, pool: dict[str, Any], resilience: dict[str, Any] | None = None,
                 prices: dict[str, Any] | None = None, controller: tuple[str, str] | None = None,
                 ledger: tuple[str, str] | None = None):
        self.pool = PoolSpec.model_validate(pool)
        self.resilience = ResilienceSpec.model_validate(resilience or {})
        self.prices = {k: ModelPrice.model_validate(v) for k, v in (prices or {}).items()}
        self.host_id = f"{self.pool.name}/{_replica_id()}"
        self._agent_cls: type[Agent] = import_object(self.pool.agent_class)
        self._controller_ref = controller
        self._ledger_ref = ledger
        self._ledger: Any = None
        n = self.pool.agents_per_host
        self._agents: list[Agent | None] = [None] * n
        self._busy = [0] * n
        self._active = min(n, max(1, self.pool.autoscaling.start_agents))
        self._idle: deque[int] = deque()
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._running: dict[asyncio.Task[Outcome], float] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self.completed = 0
        self.failed = 0
        self._rebuild_idle()

    # -- slots ---------------------------------------------------------------------
    def _rebuild_idle(self) -> None:
        c = self.pool.concurrency_per_agent
        self._idle = deque(i for i in range(self._active) for _ in range(c - self._busy[i]))
        while self._waiters and self._idle:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(self._take(self._idle.popleft()))

    def set_active(self, agents: int) -> None:
        """Run ``agents`` logical agents here; the ones above it drain."""
        agents = max(1, min(agents, self.pool.agents_per_host))
        if agents != self._active:
            self._active = agents
            self._rebuild_idle()

    def _take(self, i: int) -> int:
        self._busy[i] += 1
        return i

    async def _acquire(self) -> int:
        if self._idle:
            return self._take(self._idle.popleft())
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    def _release(self, i: int) -> None:
        self._busy[i] -= 1
        if i >= self._active:
            return  # draining: its slot is not handed out again
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(self._take(i))
                return
        self._idle.append(i)

    async def _agent(self, i: int) -> Agent:
        agent = self._agents[i]
        if agent is None:
            agent = self._agent_cls(f"{self.host_id}/{i}", **self.pool.agent_kwargs)
            await agent.setup()
            self._agents[i] = agent
        return agent

    # -- work ----------------------------------------------------------------------
    async def run_batch(self, items: list[Item], active_agents: int | None = None) -> list[Outcome]:
        """Run every item on a logical agent; one outcome per item, in order."""
        if active_agents is not None:
            self.set_active(active_agents)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        tasks = [loop.create_task(self._run_one(it)) for it in items]
        for t in tasks:
            self._running[t] = now
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                self._running.pop(t, None)

    async def run_and_record(self, items: list[Item], active_agents: int | None = None) -> int:
        """Run a batch and record its outcomes in the ledger before replying.

        The dispatcher acks the items only after this returns, so the record-before-ack
        order holds, and outcomes travel host -> ledger once instead of through the
        dispatcher. Returns how many outcomes were recorded.
        """
        outcomes = await self.run_batch(items, active_agents)
        if self._ledger is None:
            import ray

            name, namespace = self._ledger_ref
            self._ledger = ray.get_actor(name, namespace=namespace)
        await self._ledger.record.remote(outcomes)
        return len(outcomes)

    async def _run_one(self, item: Item) -> Outcome:
        i = await self._acquire()
        agent_id = f"{self.host_id}/{i}"
        started = time.time()
        try:
            agent = await self._agent(i)
            reply = await agent.handle(item_to_task(item))
            if not isinstance(reply, Reply):
                reply = Reply(reply)
            output = orjson.dumps(reply.output)
            price = self.prices.get(reply.model or "")
            cost = price.cost_usd(reply.input_tokens, reply.output_tokens) if price else 0.0
            self.completed += 1
            return Outcome(item.id, True, output, None, None, agent_id, self.pool.name,
                           item.deliveries, item.submitted_unix_s, started, time.time(),
                           reply.input_tokens, reply.output_tokens, cost)
        except asyncio.CancelledError:
            self.failed += 1
            return failed_outcome(
                item, "timeout", f"exceeded task_timeout_s={self.resilience.task_timeout_s}",
                self.pool.name, agent_id, started)
        except orjson.JSONEncodeError as exc:
            self.failed += 1
            return failed_outcome(item, "bad_output", f"output is not JSON: {exc}",
                                  self.pool.name, agent_id, started)
        except Exception as exc:  # the agent's own failure: recorded, the host lives on
            self.failed += 1
            text = "".join(traceback.format_exception_only(exc)).strip()
            return failed_outcome(item, "error", text[:MAX_ERROR_CHARS], self.pool.name,
                                  agent_id, started)
        finally:
            self._release(i)

    async def _watch(self) -> None:
        limit = self.resilience.task_timeout_s
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            for t, t0 in list(self._running.items()):
                if now - t0 > limit and not t.done():
                    t.cancel()

    # -- signals -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        cap = self._active * self.pool.concurrency_per_agent
        return {
            "host": self.host_id,
            "active_agents": self._active,
            "draining_agents": sum(1 for i in range(self._active, len(self._busy))
                                   if self._busy[i]),
            "in_flight": sum(self._busy),
            "capacity": cap,
            "waiting": len(self._waiters),
            "completed": self.completed,
            "failed": self.failed,
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Per-replica load for fleet's Serve request router."""
        s = self.stats()
        return {"in_flight": s["in_flight"] + s["waiting"], "capacity": s["capacity"]}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The pool's desired host count, as decided by fleet's controller.

        Serve's controller reads this through fleet's custom autoscaling policy; the
        question to fleet's controller is asked here, in the replica, so Serve's
        controller never blocks on an actor call.
        """
        if self._controller_ref is None:
            return {}
        import ray

        name, namespace = self._controller_ref
        try:
            ctl = ray.get_actor(name, namespace=namespace)
            hosts = await asyncio.wait_for(ctl.desired_hosts.remote(self.pool.name), 2.0)
        except Exception:
            return {}  # missing metric: the policy holds the current count
        return {"desired_hosts": float(hosts)}

    def check_health(self) -> None:
        """Serve's health probe: a host with a stuck event loop fails to answer at all."""
