"""AgentHost: one Ray Serve replica running many logical agents of one pool.

The asyncio and Serve shell around one ``HostCore`` (``fleet.policy.host``), which
decides everything: which agent takes a task (slots, the pool's router with task hints,
breakers with their ejection cap and panic mode), whether a failure is retried, which
tasks are past ``task_timeout_s`` or wedged, which agents health takes out of service
and restarts, when an outcome buffer goes to the ledger. The shell runs the agents'
coroutines, enforces the core's answers (cancels, abandons, restarts, heartbeats) and
turns them into Ray calls; ``fleet.runtime.host_batches`` holds the batch side (the
ledger records and progress reports). The simulator drives the same core on virtual
time.

A batch of items arrives in one call (``run_and_record``); each item is placed on its
own. When no agent the router accepts has a free slot the task waits in the host (the
dispatcher bounds how many tasks a pool holds, so this wait is bounded too). Each final
outcome is recorded as soon as its task finishes; failures the core retries are handed
back to the dispatcher with their delay, unrecorded.

Budgets (only when the fleet has a budget actor): a task holding an agent's slot
reserves its estimate before it runs and settles its actual cost after, through a
``BudgetClient`` that batches the calls; a task no agent may afford fails with
``budget_exhausted``; an agent refused by its own budget is parked.

Fleet-wide ejection cap: each host enforces ``max_ejected_share`` over its own agents,
so a pool whose hosts each run at least ``1 / max_ejected_share`` agents (10 for the
default 10%) never has more than that share ejected: sum_h floor(share * n_h) <=
share * sum_h n_h. Smaller hosts may each eject one agent, which the pool-wide share
then exceeds by at most one agent per host. No cross-host coordination is needed on the
hot path.
"""

from __future__ import annotations

import asyncio
import random
import time
import traceback
import uuid
from dataclasses import asdict
from typing import Any

import orjson

from fleet.agent import Agent, Reply
from fleet.policy.breaker import BreakerEvent
from fleet.policy.health import HealthEvent
from fleet.policy.host import HostCore, TickActions
from fleet.policy.routing import RoutingHint
from fleet.runtime.budget_client import BudgetClient, Grant, tenant_of
from fleet.runtime.host_batches import PROGRESS_AFTER_S, Batch, BatchReport, Recorder, Reporter
from fleet.runtime.imports import import_object
from fleet.spec.budgets import ModelPrice
from fleet.spec.health import HealthSpec
from fleet.spec.pools import PoolSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.spec.results import DEFAULT_MAX_OUTPUT_BYTES
from fleet.task import (
    IDEMPOTENT_PREFIX,
    Item,
    Outcome,
    Task,
    failed_outcome,
    item_to_task,
    payload_hash,
)

MAX_ERROR_CHARS = 2000
STATS_EVENTS = 100
REPORT_FAILURES = 10  # newest failures a host reports to the controller
BUDGET_REQUEUE = "budget_requeue"  # internal: every agent here is parked, requeue
REASON_BUDGET_EXHAUSTED = "budget_exhausted"
REASON_OUTPUT_TOO_LARGE = "output_too_large"


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (unit tests, local use)
        return uuid.uuid4().hex[:8]


def task_type(item: Item, task: Task) -> str:
    """The type a router keys success rates and expertise on: ``payload["type"]`` when
    the payload is an object with a string ``type``, else the capability."""
    p = task.payload
    if isinstance(p, dict):
        t = p.get("type")
        if isinstance(t, str):
            return t
    return item.capability


def _custom_heartbeat(agent: Agent) -> bool:
    return type(agent).heartbeat is not Agent.heartbeat


class _AllParked(Exception):
    """Every agent of the host is parked: its own budget is short."""


class AgentHost:
    """The body of a pool's Serve deployment (see ``fleet.runtime.deploy``)."""

    def __init__(
        self,
        pool: dict[str, Any],
        resilience: dict[str, Any] | None = None,
        prices: dict[str, Any] | None = None,
        controller: tuple[str, str] | None = None,
        ledger: tuple[str, str, int] | None = None,
        health: dict[str, Any] | None = None,
        budget: tuple[str, str] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        clock: Any = time.monotonic,
        rng: random.Random | None = None,
        autotick: bool = True,
    ):
        self.pool = PoolSpec.model_validate(pool)
        self.resilience = ResilienceSpec.model_validate(resilience or {})
        self.health_spec = HealthSpec.model_validate(health or {})
        self.prices = {k: ModelPrice.model_validate(v) for k, v in (prices or {}).items()}
        self.host_id = f"{self.pool.name}/{_replica_id()}"
        self._agent_cls: type[Agent] = import_object(self.pool.agent_class)
        self._controller_ref = controller
        self.max_output_bytes = max_output_bytes
        self.clock = clock
        self._autotick = autotick  # False: the caller drives core.tick (fake-clock tests)
        n = self.pool.agents_per_host
        self.core = HostCore(
            self.host_id,
            n,
            self.pool.concurrency_per_agent,
            self.pool.routing,
            self.resilience,
            self.health_spec,
            clock=clock,
            rng=rng or random.Random(),
        )
        self._agents: list[Agent | None] = [None] * n
        self.budget = BudgetClient(budget) if budget else None
        self._requeue_after: dict[str, float] = {}  # item id -> delay before redelivery
        self.recorder = Recorder(self.host_id, ledger)
        self.reporter = Reporter()
        self._work: dict[asyncio.Task[Any], tuple[Item, Batch]] = {}  # not abandoned
        self._loop_task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()  # restarts and heartbeat pings
        self._pinging: set[int] = set()
        self.completed = 0
        self.failed = 0
        self.set_active(min(n, max(1, self.pool.autoscaling.start_agents)))

    # -- agents --------------------------------------------------------------------
    def set_active(self, agents: int) -> None:
        """Run ``agents`` logical agents here; the ones above it drain."""
        core = self.core
        for i in range(agents, core.active):
            if core.agent_failing(i):
                self._agents[i] = None  # failed: a fresh instance if it comes back
                core.custom_beat.discard(i)
        self._hand(core.set_active(agents))

    def _new_agent(self, i: int) -> Agent:
        """A fresh instance of logical agent i (not set up yet), wired to the host's
        dependency breakers."""
        agent = self._agent_cls(self.core.agents[i].id, **self.pool.agent_kwargs)
        agent.dependency_breaker = self.core.breakers.registry.dependency
        return agent

    def _adopt(self, i: int, agent: Agent) -> None:
        """Agent i's router-visible attributes: expertise (task types it is best at),
        weight (relative speed of one slot), and whether it beats on its own."""
        a = self.core.agents[i]
        a.expertise = frozenset(getattr(agent, "expertise", ()) or ())
        a.weight = float(getattr(agent, "weight", 1.0))
        if _custom_heartbeat(agent):
            self.core.custom_beat.add(i)
        else:
            self.core.custom_beat.discard(i)

    async def _agent(self, i: int) -> Agent:
        agent = self._agents[i]
        if agent is None:
            agent = self._new_agent(i)
            await agent.setup()
            self._agents[i] = agent
            self._adopt(i, agent)
        return agent

    # -- the core's answers --------------------------------------------------------
    def _hand(self, handoffs: Any) -> None:
        """Give slots to the waiting tasks the core chose."""
        for fut, i in handoffs:
            if fut.done():  # gave up meanwhile: the slot goes on
                self._hand(self.core.release(i))
            else:
                fut.set_result(i)

    def _apply(self, act: TickActions | None) -> None:
        if act is None:
            return
        self._hand(act.handoffs)
        loop = asyncio.get_running_loop()
        for i, attempt in act.restart:
            self._spawn(loop, self._restart(i, attempt))
        for i in act.beat:
            agent = self._agents[i]
            if agent is not None and i not in self._pinging:
                self._pinging.add(i)
                self._spawn(loop, self._ping(i, agent))

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        t = loop.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def _ensure_loop(self) -> None:
        if self._loop_task is None and self._autotick:
            self._loop_task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        """The core's periodic pass (``HostCore.tick``): cancel tasks past their limit,
        abandon wedged ones, heartbeats, restarts, breakers turning half-open."""
        last: float | None = None
        while True:
            await asyncio.sleep(self.core.tick_s)
            now = self.clock()
            act = self.core.tick(now, last)
            last = now
            for t in act.cancel:
                t.cancel()  # type: ignore[attr-defined]  # the keys are asyncio tasks
            for t, age_s in act.abandon:
                self._abandon(t, age_s)  # type: ignore[arg-type]
            self._apply(act)

    async def _acquire(self, hint: RoutingHint | None) -> int:
        i = self.core.place(hint)
        if i is not None:
            return i
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.core.wait(fut, hint)
        try:
            return await fut
        except (asyncio.CancelledError, _AllParked):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._hand(self.core.release(fut.result()))  # got a slot too late
            else:
                self.core.withdraw(fut)
            raise

    # -- work ----------------------------------------------------------------------
    async def run_and_record(
        self,
        items: list[Item],
        active_agents: int | None = None,
        progress: tuple[str, str, str, int] | None = None,
    ) -> BatchReport:
        """Run a batch, recording each item's final outcome in the ledger as soon as it
        finishes; reply once every item is recorded or handed back for a retry.

        The dispatcher acks an item only once it is recorded: from this reply, or
        earlier from a progress report (``progress`` is (dispatcher actor name,
        namespace, pool, batch id)). Failures to retry come back in the report with
        their delays.
        """
        if active_agents is not None:
            self.set_active(active_agents)
        loop = asyncio.get_running_loop()
        self._ensure_loop()
        core = self.core
        if core.eager_setup:
            # Specialization needs every agent's expertise before the first choice.
            core.eager_setup = False
            await asyncio.gather(*(self._agent(i) for i in range(core.active)))
        now = self.clock()
        batch = Batch(items, loop.create_future(), now + PROGRESS_AFTER_S)
        if progress is not None:
            self.reporter.add(progress, batch)
        core.first_attempts(sum(1 for it in items if it.deliveries <= 1))
        work = self._work
        for it in items:
            t = loop.create_task(self._run_item(it, batch))
            core.arrive(t, now)
            work[t] = (it, batch)
        try:
            await batch.fut
        finally:
            if progress is not None:
                self.reporter.remove(progress)
        if self.budget is not None:
            await self.budget.flush()  # one settle call per batch
        return BatchReport(
            len(batch.recorded_ids), batch.retry_ids, batch.delays, self.pool_stats()
        )

    async def _run_item(self, item: Item, batch: Batch) -> None:
        cur: Any = asyncio.current_task()
        try:
            o = await self._run_one(item, cur)
        except BaseException as exc:  # a bug here must fail the batch, not hang it
            self.core.leave(cur)
            if self._work.pop(cur, None) is not None:
                batch.done += 1
                batch.failed(exc)
            raise
        if self._work.pop(cur, None) is not None:
            batch.done += 1  # its slot is free: progress reports free it in the pool
            try:
                self._settle(item, o, batch)
            except Exception as exc:  # e.g. no ledger: the batch fails, it does not hang
                batch.failed(exc)
                raise
        # else abandoned: settled and counted done already; the late end of a wedged
        # agent changes nothing.

    def _settle(self, item: Item, o: Outcome, batch: Batch, final: bool = False) -> None:
        """A task's final word: handed back for a retry, or recorded (``final``: as it
        is, never retried)."""
        if not o.ok and not final:
            o, delay = self._decide_retry(item, o)
            if delay is not None:
                batch.retry_ids.append(item.id)
                batch.delays.append(delay)
                # This delivery ran no duplicate: tell the ledger with the next records.
                self.recorder.add(item.id, None, batch)
                batch.settled()
                return
        if o.task_id.startswith(IDEMPOTENT_PREFIX):
            # Keyed tasks carry their payload's hash, so a later submission of the key
            # with another payload is refused rather than answered with this outcome.
            o = o._replace(payload_hash=payload_hash(item.payload))
        self.recorder.add(o.task_id, o, batch)

    def _decide_retry(self, item: Item, o: Outcome) -> tuple[Outcome, float | None]:
        """A failed outcome: (outcome, delay) to retry after ``delay`` seconds, or
        (final outcome, None) to record."""
        if o.reason == BUDGET_REQUEUE:
            delay = self.core.requeue_delay(
                item.deliveries, self._requeue_after.pop(item.id, None)
            )
            if delay is None:
                self.failed += 1
                return o._replace(reason=REASON_BUDGET_EXHAUSTED), None
            return o, delay
        left = (item.deadline_unix_s - time.time()) if item.deadline_unix_s else None
        r = self.core.decide_retry(item.deliveries, o.reason, o.error, left)
        if r.delay_s is not None:
            return o, r.delay_s
        if r.reason != o.reason:
            o = o._replace(reason=r.reason, error=(r.error or "")[:MAX_ERROR_CHARS])
        return o, None

    async def _run_one(self, item: Item, cur: Any) -> Outcome:
        core = self.core
        task: Task | None = None
        hint: RoutingHint | None = None
        kind: str | None = None
        if core.hinted:
            task = item_to_task(item)
            kind = task_type(item, task)
            hint = RoutingHint(kind, item.affinity_key)
        grant: Grant | None = None
        try:
            if self.budget is None:
                i = await self._acquire(hint)
            else:
                got = await self._acquire_budgeted(item, task, hint)
                if isinstance(got, Outcome):  # refused: no agent here may run it
                    core.leave(cur)
                    return got
                i, grant = got
        except asyncio.CancelledError:
            core.leave(cur)
            self.failed += 1  # timed out waiting for an agent: no agent to blame
            return failed_outcome(
                item,
                "timeout",
                f"exceeded task_timeout_s={self.resilience.task_timeout_s} "
                "waiting for a free agent",
                self.pool.name,
            )
        agent_id = core.agents[i].id
        core.start(cur, i, item.id)
        started = time.time()
        t0 = self.clock()  # the core's time: task latencies feed EWMAs and breakers
        ok = False
        spent: tuple[float, int] | None = None  # (USD, tokens) of a completed task
        try:
            agent = self._agents[i] or await self._agent(i)
            reply = await agent.handle(task or item_to_task(item))
            if not isinstance(reply, Reply):
                reply = Reply(reply)
            output = orjson.dumps(reply.output)
            if len(output) > self.max_output_bytes:
                self.failed += 1
                return failed_outcome(
                    item,
                    REASON_OUTPUT_TOO_LARGE,
                    f"output is {len(output)} bytes encoded, over results.max_output_bytes"
                    f"={self.max_output_bytes}",
                    self.pool.name,
                    agent_id,
                    started,
                )
            price = self.prices.get(reply.model or "")
            cost = price.cost_usd(reply.input_tokens, reply.output_tokens) if price else 0.0
            spent = (cost, reply.input_tokens + reply.output_tokens)
            self.completed += 1
            ok = True
            return Outcome(
                item.id, True, output, None, None, agent_id, self.pool.name,
                item.deliveries, item.submitted_unix_s, started, time.time(),
                reply.input_tokens, reply.output_tokens, cost,
            )  # fmt: skip
        except asyncio.CancelledError:
            self.failed += 1
            return failed_outcome(
                item,
                "timeout",
                f"exceeded task_timeout_s={self.resilience.task_timeout_s}",
                self.pool.name,
                agent_id,
                started,
            )
        except orjson.JSONEncodeError as exc:
            self.failed += 1
            return failed_outcome(
                item,
                "bad_output",
                f"output is not JSON: {exc}",
                self.pool.name,
                agent_id,
                started,
            )
        except Exception as exc:  # the agent's own failure: recorded, the host lives on
            self.failed += 1
            text = "".join(traceback.format_exception_only(exc)).strip()
            return failed_outcome(
                item, "error", text[:MAX_ERROR_CHARS], self.pool.name, agent_id, started
            )
        finally:
            if grant is not None:
                self._settle_budget(grant, spent)
            self._hand(core.finish(cur, ok, self.clock() - t0, kind))
            if core.pending is not None:
                self._apply(core.take_pending())

    def _abandon(self, t: asyncio.Task[Any], age_s: float) -> None:
        """The core found ``t`` wedged: it fails with ``timeout`` now, recorded and not
        retried (it would wedge another agent), without holding its batch-mates."""
        got = self._work.pop(t, None)
        if got is None:
            return
        item, batch = got
        batch.done += 1
        on = self.core.watch.on.get(t)
        agent_id = self.core.agents[on[0]].id if on is not None and on[0] >= 0 else None
        limit = self.resilience.task_timeout_s
        try:
            self._settle(
                item,
                failed_outcome(
                    item,
                    "timeout",
                    f"exceeded task_timeout_s={limit} and ignored cancellation for "
                    f"{age_s - limit:.1f} s: abandoned (its agent is restarted)",
                    self.pool.name,
                    agent_id,
                ),
                batch,
                final=True,
            )
        except Exception as exc:  # never kill the tick loop: fail this batch instead
            batch.failed(exc)

    # -- budgets ---------------------------------------------------------------------
    async def _acquire_budgeted(
        self, item: Item, task: Task | None, hint: RoutingHint | None
    ) -> tuple[int, Grant] | Outcome:
        """An agent slot and a budget reservation for the task, or its outcome.

        Granted: (agent, grant). Refused by the agent's own budget: the agent is parked
        and the task tries another agent here; when every agent here is parked, the task
        goes back to the queue (``BUDGET_REQUEUE``) for another host or for later.
        Refused by a shared budget (fleet, pool, tenant): no agent may run it, the task
        fails with ``budget_exhausted``. The slot is released on every path but a grant.
        """
        assert self.budget is not None
        core = self.core
        tenant = tenant_of(task.payload if task is not None else orjson.loads(item.payload))
        while True:
            try:
                if core.all_parked():
                    raise _AllParked
                i = await self._acquire(hint)
            except _AllParked:  # every agent here is out of its own budget
                self._requeue_after.setdefault(item.id, core.parking.retry_after_s)
                return failed_outcome(
                    item,
                    BUDGET_REQUEUE,
                    f"every agent on host {self.host_id} is out of its own budget",
                    self.pool.name,
                )
            agent_id = core.agents[i].id
            try:
                g = await self.budget.reserve(agent_id, self.pool.name, tenant)
            except BaseException as exc:
                self._hand(core.release(i))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # The budget actor is unavailable: fail retryably, nothing runs unbooked.
                return failed_outcome(
                    item, "error", repr(exc)[:MAX_ERROR_CHARS], self.pool.name, agent_id
                )
            if g.reservation_id is not None:
                return i, g
            if not g.retry_elsewhere:
                self._hand(core.release(i))
                self.failed += 1
                return failed_outcome(
                    item, REASON_BUDGET_EXHAUSTED, g.detail, self.pool.name, agent_id
                )
            after_s, evicted = core.park(i, g.retry_after_s)
            asyncio.get_running_loop().call_later(after_s, self._unpark, i)
            for fut in evicted:
                if not fut.done():
                    fut.set_exception(_AllParked())

    def _unpark(self, i: int) -> None:
        self._hand(self.core.unpark(i))

    def _settle_budget(self, grant: Grant, spent: tuple[float, int] | None) -> None:
        """Queue the settlement (sent with the batch): a completed task at its actual
        cost, any other at its estimate (it may have spent before failing)."""
        assert self.budget is not None
        if spent is None:
            self.budget.settle_at_estimate(grant)
        else:
            self.budget.settle(grant, spent[0], spent[1])

    # -- health ----------------------------------------------------------------------
    async def _ping(self, i: int, agent: Agent) -> None:
        """Ask an agent for its heartbeat; no answer within the interval is none."""
        try:
            await asyncio.wait_for(agent.heartbeat(), self.health_spec.heartbeat_interval_s)
        except Exception:
            return  # missed: the monitor notices when heartbeat_timeout_s has passed
        finally:
            self._pinging.discard(i)
        if self._agents[i] is agent:
            self.core.heartbeat(i)
            self._apply(self.core.take_pending())

    async def _restart(self, i: int, attempt: int) -> None:
        """A new instance of agent i, set up again; in service once it reports."""
        self._agents[i] = None
        self.core.custom_beat.discard(i)  # the core beats for it until it is back
        try:
            agent = self._new_agent(i)
            await asyncio.wait_for(agent.setup(), self.health_spec.startup_timeout_s)
            if _custom_heartbeat(agent):
                await asyncio.wait_for(
                    agent.heartbeat(), self.health_spec.heartbeat_interval_s
                )
        except Exception as exc:
            text = "".join(traceback.format_exception_only(exc)).strip()[:500]
            self.core.restart_failed(i, f"restart {attempt} failed: {text}")
            self._apply(self.core.take_pending())
            return
        if self.core.restart_done(
            i, getattr(agent, "expertise", ()) or (), float(getattr(agent, "weight", 1.0))
        ):
            self._agents[i] = agent
            self._adopt(i, agent)
        self._apply(self.core.take_pending())

    @property
    def restarts(self) -> int:
        return self.core.health.restarts

    @property
    def retries(self) -> int:
        return self.core.retries.retries

    @property
    def abandoned(self) -> int:
        return self.core.watch.n_abandoned

    def health_report(self) -> dict[str, Any]:
        """This host's agents' health for the controller (sent about once a second)."""
        h = self.core.health
        mon = h.monitor
        failing, total = mon.failing_and_total()
        mono, wall = self.clock(), time.time()
        return {
            **h.gate.report(failing, total, mon.due_restarts()),
            "host": self.host_id,
            "counts": mon.counts(),
            "breaker_ejected": len(self.core.breakers.registry.ejected),
            "restarts": h.restarts,
            "failures": dict(mon.failure_counts),
            "last_failures": [
                {
                    "at_unix_s": wall - (mono - f.at_s),
                    "agent_id": f.agent_id,
                    "reason": f.reason,
                    "detail": f.detail,
                }
                for f in list(mon.failures)[-REPORT_FAILURES:]
            ],
        }

    def apply_health_verdict(self, verdict: dict[str, Any]) -> None:
        """The fleet guard's answer to ``health_report``: its state and our permits."""
        self.core.apply_verdict(verdict["state"], int(verdict.get("permits", 0)))
        self._apply(self.core.take_pending())

    def health_problem(self) -> str | None:
        """Why Serve should replace this host, or None (see ``check_health``)."""
        t = self._loop_task
        if t is not None and t.done():
            exc = None if t.cancelled() else t.exception()
            return f"the health loop stopped: {exc!r}"
        return self.core.health_problem(self.clock())

    # -- signals -------------------------------------------------------------------
    def pool_stats(self) -> dict[str, Any]:
        """Compact per-host counts for the dispatcher's per-pool status (cheap: it
        rides on every batch reply)."""
        reg = self.core.breakers.registry
        return {
            "host": self.host_id,
            "agents": self.core.active,
            "ejected": len(reg.ejected),
            "max_ejected": reg.max_ejected,
            "panic": reg.panic,
            "retries": self.core.retries.retries,
            "retry_budget_denied": self.core.retries.policy.budget.denied,
        }

    async def stats(self, events: int | None = STATS_EVENTS) -> dict[str, Any]:
        """Load, outcomes, breakers (snapshot and the last ``events`` breaker events,
        all kept ones if None), health and retries of this host.

        Async so that it runs on the host's event loop: Serve runs sync methods in a
        thread pool, and reading the breakers advances their state."""
        core = self.core
        core.settle_breakers()  # so the breakers' counts are complete
        mono, wall = self.clock(), time.time()
        brk, h = core.breakers, core.health

        def last(log: Any) -> list[Any]:
            kept = list(log.events)
            return kept if events is None else (kept[-events:] if events > 0 else [])

        return {
            "host": self.host_id,
            "active_agents": core.active,
            "draining_agents": sum(1 for a in core.agents[core.active :] if a.in_flight),
            "in_flight": core.in_flight,
            "capacity": core.active * core.c,
            "waiting": len(core.slots.waiters),
            "budget_parked_slots": core.parking.slots,
            "completed": self.completed,
            "failed": self.failed,
            "abandoned": self.abandoned,
            "retries": core.retries.retries,
            "final_failures": dict(core.retries.final),
            "retry_budget": core.retries.policy.budget.snapshot(),
            "router": self.pool.routing.router.value,
            "breakers": brk.registry.snapshot(),
            "breaker_event_counts": dict(brk.log.counts),
            "breaker_events": [_event_dict(e, mono, wall) for e in last(brk.log)],
            "health": {
                **h.monitor.snapshot(),
                "restarts": h.restarts,
                "out_of_service": sorted(core.agents[i].id for i in h.out),
                "event_counts": dict(h.events.counts),
                "events": [_health_event_dict(e, mono, wall) for e in last(h.events)],
            },
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Per-replica load for fleet's Serve request router (plain reads of counters,
        safe from Serve's thread pool)."""
        core = self.core
        return {
            "in_flight": core.in_flight + len(core.slots.waiters),
            "capacity": core.active * core.c,
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The pool's desired host count, as decided by fleet's controller.

        Serve's controller reads this through fleet's custom autoscaling policy; the
        question to fleet's controller is asked here, in the replica, so Serve's
        controller never blocks on an actor call. The agents' health rides on the same
        call; the reply carries the fleet cascade guard's verdict.
        """
        self._ensure_loop()
        if self._controller_ref is None:
            return {}
        import ray

        name, namespace = self._controller_ref
        try:
            ctl = ray.get_actor(name, namespace=namespace)
            reply = await asyncio.wait_for(
                ctl.host_report.remote(self.pool.name, self.health_report()), 2.0
            )
        except Exception:
            return {}  # missing metric: the policy holds the current count
        self.apply_health_verdict(reply["health"])
        return {"desired_hosts": float(reply["desired_hosts"])}

    async def check_health(self) -> None:
        """Serve's health probe. A host with a stuck event loop fails to answer at all;
        one whose agents all stay failed despite in-host restarts (and no fleet-wide
        cascade holds restarts back) raises, so Serve replaces it."""
        self._ensure_loop()
        problem = self.health_problem()
        if problem is not None:
            raise RuntimeError(f"host {self.host_id}: {problem}")


def _event_dict(e: BreakerEvent, now_mono: float, now_unix: float) -> dict[str, Any]:
    d = asdict(e)
    d["kind"] = e.kind.value
    d["old"] = e.old.value if e.old is not None else None
    d["new"] = e.new.value if e.new is not None else None
    d["at_unix_s"] = now_unix - (now_mono - e.at_s)
    return d


def _health_event_dict(e: HealthEvent, now_mono: float, now_unix: float) -> dict[str, Any]:
    return {
        "at_unix_s": now_unix - (now_mono - e.at_s),
        "kind": e.kind.value,
        "subject": e.subject,
        "old": e.old,
        "new": e.new,
        "reason": e.reason,
    }


__all__ = ["AgentHost", "BatchReport", "task_type"]
