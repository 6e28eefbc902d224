"""AgentHost: one Ray Serve replica running many logical agents of one pool.

The asyncio and Serve shell around one ``HostCore`` (``fleet.policy.host``), which
decides everything: which agent takes a task (slots, the pool's router with task hints,
breakers with their ejection cap and panic mode), whether a failure is retried, which
tasks are past ``task_timeout_s`` or wedged, which agents health takes out of service
and restarts, when an outcome buffer goes to the ledger. The shell runs the agents'
coroutines, enforces the core's answers (cancels, abandons, restarts, heartbeats) and
turns them into Ray calls. The simulator drives the same core on virtual time.

The shell's parts, one module each in ``fleet.runtime``: ``host_batches`` (batches,
ledger records, progress reports), ``host_slots`` (agent slots as futures),
``host_budget`` (a budget reservation per task, when the fleet has budgets),
``host_agents`` (the agent instances: setup, heartbeat pings, restarts),
``host_outcomes`` (one task on one agent: its reply or failure as an outcome),
``host_views`` (stats and health reports).

A batch of items arrives in one call (``run_and_record``); each item is placed on its
own. When no agent the router accepts has a free slot the task waits in the host (the
dispatcher bounds how many tasks a pool holds, so this wait is bounded too). Each final
outcome is recorded as soon as its task finishes; failures the core retries are handed
back to the dispatcher with their delay, unrecorded.

Fleet-wide ejection cap: each host enforces ``max_ejected_share`` over its own agents,
so a pool whose hosts each run at least ``1 / max_ejected_share`` agents (10 for the
default 10%) never has more than that share ejected: sum_h floor(share * n_h) <=
share * sum_h n_h. Smaller hosts may each eject one agent, which the pool-wide share
then exceeds by at most one agent per host. No cross-host coordination is needed on the
hot path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from collections.abc import Collection
from typing import Any

from fleet.agent import Agent
from fleet.llm import client_for
from fleet.llm.caps import CURRENT as CAP
from fleet.llm.caps import Cap
from fleet.observability.metrics import Sink, TenantLabels
from fleet.observability.tracing import TaskTracer
from fleet.policy.host import HostCore, TickActions
from fleet.policy.preemption import PREEMPTED, PREEMPTED_DELAY
from fleet.policy.routing import RoutingHint
from fleet.runtime import host_views
from fleet.runtime.budget_client import BudgetClient, Grant
from fleet.runtime.cpu_meter import CpuMeter
from fleet.runtime.host_agents import AgentSet
from fleet.runtime.host_batches import PROGRESS_AFTER_S, Batch, BatchReport, Recorder, Reporter
from fleet.runtime.host_budget import BUDGET_REQUEUE, REASON_BUDGET_EXHAUSTED, BudgetGate
from fleet.runtime.host_metrics import DEFAULT_FLEET, HostMetrics
from fleet.runtime.host_outcomes import failed_run, max_error_chars, run_on_agent
from fleet.runtime.host_slots import SlotFutures
from fleet.runtime.imports import import_object
from fleet.security.redact import Redactor, pool_secret_values, redact_logs
from fleet.spec.budgets import ModelPrice
from fleet.spec.health import HealthSpec
from fleet.spec.observability import ObservabilitySpec
from fleet.spec.pools import PoolSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.spec.results import DEFAULT_MAX_OUTPUT_BYTES
from fleet.task import Item, Outcome, Task, failed_outcome, item_to_task

METRICS_LOG = logging.getLogger("fleet.runtime.host_metrics")


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
        observability: dict[str, Any] | None = None,
        metric_tenants: list[str] | None = None,
        clock: Any = time.monotonic,
        rng: random.Random | None = None,
        autotick: bool = True,
        metrics_sink: Sink | None = None,
    ):
        self.pool = PoolSpec.model_validate(pool)
        redact_logs(Redactor(pool_secret_values(self.pool)))
        self.resilience = ResilienceSpec.model_validate(resilience or {})
        self.health_spec = HealthSpec.model_validate(health or {})
        self.observability = ObservabilitySpec.model_validate(observability or {})
        self.prices = {k: ModelPrice.model_validate(v) for k, v in (prices or {}).items()}
        self.host_id = f"{self.pool.name}/{_replica_id()}"
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
        agent_cls: type[Agent] = import_object(self.pool.agent_class)
        self.agent_set = AgentSet(
            agent_cls,
            self.pool.agent_kwargs,
            self.core,
            self.health_spec,
            self._apply_pending,
            # The pool's model, shared (``self.llm``); without one, each agent's own.
            client_for(self.pool.llm) if self.pool.llm is not None else None,
        )
        self.slots = SlotFutures(self.core)
        self.gate = BudgetGate(
            self.core,
            self.slots,
            self.pool.name,
            self.host_id,
            BudgetClient(budget) if budget else None,
        )
        # Tenants with a label value of their own: the spec's (deploy passes them).
        self.metrics = HostMetrics(
            self.pool.name,
            TenantLabels((*self.observability.metric_tenants, *(metric_tenants or ()))),
            metrics_sink,
            fleet=ledger[0] if ledger is not None else DEFAULT_FLEET,  # the fleet's name
        )
        # Spans of sampled tasks (a real tracer provider only: else one check per batch).
        self.tracer = TaskTracer.from_spec(self.observability.tracing)
        self.recorder = Recorder(self.host_id, ledger, self.metrics, self.tracer)
        self.reporter = Reporter(self.preempt)
        # Runs cancelled by preemption (``pools[].preemption``): handed back, not failed.
        self.preempted: set[asyncio.Task[Any]] = set()
        # A provider's Retry-After of a failed run, by task id, until its retry is
        # decided (``fleet.llm``): the retry waits at least that long.
        self.retry_after: dict[str, float] = {}
        self._work: dict[asyncio.Task[Any], tuple[Item, Batch]] = {}  # not abandoned
        self._loop_task: asyncio.Task[None] | None = None
        self.completed = 0
        self.failed = 0
        self.set_active(min(n, max(1, self.pool.autoscaling.start_agents)))

    # -- agents --------------------------------------------------------------------
    def set_active(self, agents: int) -> None:
        """Run ``agents`` logical agents here; the ones above it drain."""
        core = self.core
        for i in range(agents, core.active):
            if core.agent_failing(i):
                self.agent_set.drop(i)  # failed: a fresh instance if it comes back
        self.slots.hand(core.set_active(agents))

    @property
    def budget(self) -> BudgetClient | None:
        """The budget actor's client (None: the fleet has no budgets); set it to swap in
        another backend."""
        return self.gate.client

    @budget.setter
    def budget(self, client: BudgetClient | None) -> None:
        self.gate.client = client

    # -- the core's answers --------------------------------------------------------
    def _apply(self, act: TickActions | None) -> None:
        if act is None:
            return
        self.slots.hand(act.handoffs)
        self.agent_set.start(act.restart, act.beat)

    def _apply_pending(self) -> None:
        """Apply what the core decided outside a call that answers (health events)."""
        self._apply(self.core.take_pending())

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
            try:  # never stop the tick loop over a metric
                self.metrics.flush(self.core.breakers.log.counts)
            except Exception:
                METRICS_LOG.warning("could not send the host's metrics", exc_info=True)

    # -- work ----------------------------------------------------------------------
    async def run_and_record(
        self,
        items: list[Item],
        active_agents: int | None = None,
        progress: tuple[str, str, str, int] | None = None,
        sent_unix_s: float | None = None,
    ) -> BatchReport:
        """Run a batch, recording each item's final outcome in the ledger as soon as it
        finishes; reply once every item is recorded or handed back for a retry.

        The dispatcher acks an item only once it is recorded: from this reply, or
        earlier from a progress report (``progress`` is (dispatcher actor name,
        namespace, pool, batch id)). Failures to retry come back in the report with
        their delays. ``sent_unix_s``: when the dispatcher sent the batch (its queue
        wait and dispatch overhead are measured from it).
        """
        received = time.time()
        if active_agents is not None:
            self.set_active(active_agents)
        loop = asyncio.get_running_loop()
        self._ensure_loop()
        core = self.core
        if core.eager_setup:
            # Specialization needs every agent's expertise before the first choice.
            core.eager_setup = False
            await asyncio.gather(*(self.agent_set.get(i) for i in range(core.active)))
        self.metrics.batch_arrived(items, sent_unix_s, received)
        if self.tracer.enabled:
            self._trace(items, received if sent_unix_s is None else sent_unix_s, received)
        now = self.clock()
        batch = Batch(items, loop.create_future(), now + PROGRESS_AFTER_S)
        batch.fut.add_done_callback(functools.partial(self._batch_done, batch))
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
            len(batch.recorded_ids), batch.retry_ids, batch.delays, host_views.pool_stats(self)
        )

    def _batch_done(self, batch: Batch, fut: asyncio.Future[None]) -> None:
        """A batch that failed: its items leave without an outcome recorded here."""
        if not fut.cancelled() and fut.exception() is not None:
            self.recorder.dropped([it.id for it in batch.items])

    def _trace(self, items: list[Item], sent: float, received: float) -> None:
        """Note the sampled tasks: their spans are made once their outcome is recorded
        (``Recorder``); tasks handed back for a retry are traced on their next run."""
        wants, note = self.tracer.wants, self.recorder.note_traced
        for it in items:
            if wants(it):
                note(it, sent, received)

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
        delay = None
        if not o.ok and not final:
            o, delay = self._decide_retry(item, o)
        elif self.retry_after:
            self.retry_after.pop(item.id, None)
        self.recorder.settle(item, o, batch, delay)

    def _decide_retry(self, item: Item, o: Outcome) -> tuple[Outcome, float | None]:
        """A failed outcome: (outcome, delay) to retry after ``delay`` seconds, or
        (final outcome, None) to record."""
        # The provider's Retry-After of this run, if any (taken whatever is decided).
        after = self.retry_after.pop(item.id, 0.0) if self.retry_after else 0.0
        if o.reason == PREEMPTED:  # back to the queue at once, its delivery refunded
            return o, PREEMPTED_DELAY
        if o.reason == BUDGET_REQUEUE:
            delay = self.gate.requeue_delay(item)
            if delay is None:
                self.failed += 1
                return o._replace(reason=REASON_BUDGET_EXHAUSTED), None
            return o, delay
        left = (item.deadline_unix_s - time.time()) if item.deadline_unix_s else None
        r = self.core.decide_retry(item.deliveries, o.reason, o.error, left)
        if r.delay_s is not None:
            # Not before the provider said to come back (its Retry-After), if it did.
            return o, max(r.delay_s, after)
        if r.reason != o.reason:
            cap = max_error_chars(self.observability.traceback_chars)
            o = o._replace(reason=r.reason, error=(r.error or "")[:cap])
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
        gate = self.gate
        try:
            if gate.client is None:
                i = await self.slots.acquire(hint)
            else:
                got = await gate.acquire(item, task, hint)
                if isinstance(got, Outcome):  # refused: no agent here may run it
                    core.leave(cur)
                    if got.reason == REASON_BUDGET_EXHAUSTED:
                        self.failed += 1
                    return got
                i, grant = got
        except asyncio.CancelledError:
            core.leave(cur)
            if cur in self.preempted:  # preempted before it had an agent
                self.preempted.discard(cur)
                return failed_outcome(item, PREEMPTED, "preempted", self.pool.name)
            self.failed += 1  # timed out waiting for an agent: no agent to blame
            return failed_run(
                self,
                item,
                "timeout",
                f"exceeded task_timeout_s={self.resilience.task_timeout_s} "
                "waiting for a free agent",
            )
        core.start(cur, i, item.id)
        t0 = self.clock()  # the core's time: task latencies feed EWMAs and breakers
        ok = False
        spent: tuple[float, int] | None = None  # (USD, tokens) of a completed task
        judged: bool | None = False
        # Where budgets are: the agent's own CPU seconds (``cpu_s`` quotas), and its
        # reservation as the cap of its model calls (``fleet.llm.caps``).
        meter = cap = capped = None
        if grant is not None:
            meter = CpuMeter()
            cap = Cap.of_grant(grant.estimate_tokens, grant.estimate_usd, self.prices)
            capped = CAP.set(cap)
        try:
            o = await run_on_agent(self, i, item, task, meter)
            if o.ok:
                ok, spent = True, (o.cost_usd, o.input_tokens + o.output_tokens)
                if cap is not None:  # no less than its model calls used
                    spent = (max(spent[0], cap.used_usd), max(spent[1], cap.used_tokens))
                self.completed += 1
            elif o.reason == PREEMPTED:
                judged = None  # says nothing of the agent
            else:
                self.failed += 1
            return o
        finally:
            self.preempted.discard(cur)
            if grant is not None:  # its CPU as run, even when cut short
                CAP.reset(capped)
                gate.settle(grant, spent, meter.cpu_s)
            verdict = None if judged is None else ok
            self.slots.hand(core.finish(cur, verdict, self.clock() - t0, kind))
            if core.pending is not None:
                self._apply(core.take_pending())

    def preempt(self, batch: Batch, ids: Collection[str]) -> int:
        """Cancel the runs of ``ids`` in ``batch`` (the dispatcher preempts them for
        urgent work): each ends as ``preempted`` and goes back to the queue with its
        delivery refunded; its agent is not blamed. Returns how many were running."""
        n = 0
        for t, (item, b) in list(self._work.items()):
            if b is batch and item.id in ids and t not in self.preempted:
                self.preempted.add(t)
                t.cancel()
                n += 1
        return n

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
        error = (
            f"exceeded task_timeout_s={limit} and ignored cancellation for "
            f"{age_s - limit:.1f} s: abandoned (its agent is restarted)"
        )
        try:
            self._settle(
                item,
                failed_run(self, item, "timeout", error, agent_id),
                batch,
                final=True,
            )
        except Exception as exc:  # never kill the tick loop: fail this batch instead
            batch.failed(exc)

    # -- health ----------------------------------------------------------------------
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
        return host_views.health_report(self)

    def apply_health_verdict(self, verdict: dict[str, Any]) -> None:
        """The fleet guard's answer to ``health_report``: its state and our permits."""
        self.core.apply_verdict(verdict["state"], int(verdict.get("permits", 0)))
        self._apply_pending()

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
        return host_views.pool_stats(self)

    async def stats(self, events: int | None = host_views.STATS_EVENTS) -> dict[str, Any]:
        """Load, outcomes, breakers (snapshot and the last ``events`` breaker events,
        all kept ones if None), health and retries of this host.

        Async so that it runs on the host's event loop: Serve runs sync methods in a
        thread pool, and reading the breakers advances their state."""
        return host_views.host_stats(self, events)

    def record_routing_stats(self) -> dict[str, Any]:
        """Per-replica load for fleet's Serve request router (plain reads of counters,
        safe from Serve's thread pool)."""
        return host_views.routing_stats(self)

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


__all__ = ["AgentHost", "BatchReport", "task_type"]
