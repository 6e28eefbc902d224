"""Controller: the control loop. Reads queue depth and in-flight work, runs the pure
autoscaling policy per pool, and tells the dispatcher (logical agents) and Serve, via
the hosts' ``desired_hosts`` metric, how much capacity to run. It keeps a timeline of
every decision for ``fleet status`` and the autoscaling trace.

It also holds the fleet-wide view of agent health (``fleet.runtime.fleet_health``): the
hosts' reports arrive with their autoscaling metric (``host_report``), and the fleet's
cascade guard answers them; its alert goes to the same alert log as the queue alerts.

It survives its own death. Ray restarts it (``fleet.runtime.lifecycle``); with the
sqlite storage backend (the default) each tick's agent counts, autoscaling states and
timeline samples are committed to ``<fleet directory>/control.sqlite3``
(``fleet.runtime.control_store``), and a restarted controller resumes from them: its
stabilization window still holds what it held at the kill, so a restart never drops
agents. A restarted controller restarts its own loop. Each tick it also reads the
control actors' states and restart counts from Ray's GCS: a restart raises the
``control_actor_restarted`` alert (its own included), and an actor that is not ALIVE
is not called (a call would wait for its restart), so one restarting actor never
stalls the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import Any

import ray
from ray import serve

from fleet.observability.logs import CONTROL_LOG, log_event
from fleet.observability.metrics import RaySink
from fleet.observability.scrape import fleet_exposition
from fleet.policy.admission import (
    LEVELS,
    AdmissionRule,
    EntryShares,
    LoadEstimator,
    PoolLoad,
    ShedDemand,
    counts_as_demand,
    predicted_wait_s,
)
from fleet.policy.autoscaling import ScalingDecision, ScalingInput, ScalingState, decide
from fleet.policy.bulkhead import BULKHEAD
from fleet.policy.degrade import DEGRADED, Degrader, DegradeSignals, ErrorRate
from fleet.policy.queue_alerts import AlertEvaluator
from fleet.queue.monitor import QueueMonitor
from fleet.queue.storage import StorageError
from fleet.runtime.control_metrics import ControlMetrics
from fleet.runtime.control_store import (
    ControlSnapshot,
    PoolControl,
    make_control_store,
    resume_t_s,
)
from fleet.runtime.fleet_health import FleetHealth
from fleet.runtime.lifecycle import (
    ALIVE,
    MISSING,
    RestartWatch,
    actor_states,
    on_start,
    resume_after_restart,
)
from fleet.runtime.names import Names
from fleet.spec.fleet import FleetSpec
from fleet.spec.queues import Discipline

TIMELINE_MAX_SAMPLES = 100_000
ALERT_LOG_MAX = 1_000
# A read (stats, actor states) that takes longer fails this tick's view of that actor,
# instead of stalling the loop (a call to an actor that died between the state read and
# the call waits for its restart).
READ_TIMEOUT_S = 5.0
# A pool with no running host for this long is down: admission control refuses its
# tasks as unavailable (HTTP 503) rather than queue them for a pool that cannot run.
DOWN_AFTER_S = 10.0


def log_scale(
    pool: str, old: int, decision: ScalingDecision, queued: int | None, in_flight: int
) -> None:
    """Log a pool's agent count changing (``fleet.control``, INFO), with the policy's
    reason and what it saw; a tick that holds the count logs nothing."""
    if decision.agents == old:
        return
    log_event(
        CONTROL_LOG,
        logging.INFO,
        "pool_scaled",
        pool=pool,
        old_agents=old,
        new_agents=decision.agents,
        reason=decision.reason,
        raw_desired=decision.raw_desired,
        queued=queued,
        in_flight=in_flight,
    )


def _per_priority(stats: list[dict[str, Any]], key: str) -> list[int]:
    """A per-priority figure summed over a queue's shards."""
    out = [0] * LEVELS
    for st in stats:
        for p, n in enumerate(st.get(key, ())):
            out[p] += n
    return out


class ControlActorUnavailable(RuntimeError):
    """A control actor the tick needs is not ALIVE (restarting, pending or gone)."""


async def _unavailable(name: str, state: str) -> Any:
    raise ControlActorUnavailable(f"{name} is {state}")


@ray.remote(num_cpus=0)
class Controller:
    def __init__(self, spec: dict[str, Any], resume: bool = False):
        """``resume``: carry on from the control store, as after a restart (``fleet
        apply`` replaces the controller this way)."""
        self.spec = FleetSpec.model_validate(spec)
        self.names = Names(self.spec.name)
        ns = self.spec.namespace
        restarted = on_start(ns, self.names.controller)
        self._shards = {
            p.capability: [
                ray.get_actor(self.names.shard(p.capability, i), namespace=ns)
                for i in range(self.spec.queues.shards)
            ]
            for p in self.spec.pools
        }
        self._clock = time.monotonic
        now = self._clock()
        # A restart resumes from the store; a fresh deploy starts a new run from the spec.
        self._store = make_control_store(
            self.spec.queues.storage, ns, self.spec.name, TIMELINE_MAX_SAMPLES
        )
        if restarted or resume:
            snap = self._store.load(now)
        else:
            self._store.reset()
            snap = ControlSnapshot()
        self._agents = {
            p.name: snap.pools[p.name].agents
            if p.name in snap.pools
            else p.autoscaling.start_agents
            for p in self.spec.pools
        }
        self._state: dict[str, ScalingState] = {
            p.name: snap.pools[p.name].state if p.name in snap.pools else ScalingState()
            for p in self.spec.pools
        }
        self._last_enqueued: dict[str, tuple[float, int]] = {}
        self._hosts: dict[str, tuple[int, int]] = {}  # pool -> (running, stopping)
        self._timeline: deque[dict[str, Any]] = deque(
            snap.timeline, maxlen=TIMELINE_MAX_SAMPLES
        )
        self._last: dict[str, dict[str, Any]] = {s["pool"]: s for s in snap.timeline}
        # The timeline's t_s carries on from the last sample saved (plus the downtime).
        self._t0 = now - resume_t_s(snap.timeline, time.time())
        seen = dict(snap.restarts_seen)
        if restarted:  # with no saved baseline, its own restart still alerts
            seen.setdefault(self.names.controller, 0)
        self._restarts = RestartWatch(seen)
        self._restarts_saved: dict[str, int] | None = None
        self._control_names = self.names.control_actors(self.spec)
        self._control: dict[str, dict[str, Any]] = {}  # the last tick's actor states
        self._monitor = QueueMonitor()
        self._alerts = AlertEvaluator(self.spec.queues.alerts)
        self._alert_log: deque[dict[str, Any]] = deque(maxlen=ALERT_LOG_MAX)
        self._metrics = ControlMetrics(
            self.spec, RaySink(), resumed=restarted or resume
        )  # labelled with the fleet's name
        self._health = FleetHealth(
            self.spec.health, [p.name for p in self.spec.pools], on_alert=self._log_alert
        )
        self._budget_snapshot: dict[str, Any] | None = None
        self._budget_alerts: deque[dict[str, Any]] = deque(maxlen=ALERT_LOG_MAX)
        self._dispatcher: Any = None  # looked up by name when first needed
        # Admission control (fleet.policy.admission): each pool's load, published to
        # the entry points; the refusals they report, as demand for the autoscaler.
        self._rules = {
            p.name: AdmissionRule.of(p.admission, self.spec.budgets) for p in self.spec.pools
        }
        self._estimators = {p.name: LoadEstimator() for p in self.spec.pools}
        self._loads: dict[str, PoolLoad] = {}
        horizon = 3 * self.spec.control_interval_s
        self._entries = {p.name: EntryShares(horizon) for p in self.spec.pools}
        self._down_since: dict[str, float] = {}  # pools Serve reports no running host for
        self._shed_new: dict[str, int] = {}  # refusals reported since the last tick
        self._shed_demand: dict[str, ShedDemand] = {}  # their smoothed count per tick
        self._shed_totals: dict[str, dict[str, dict[str, int]]] = {}  # pool/class/reason
        # Degradation (fleet.policy.degrade): the rule holding per pool, in its load.
        self._degraders = {
            p.name: Degrader(p.name, p.degrade) for p in self.spec.pools if p.degrade
        }
        self._error_rates = {p: ErrorRate() for p in self._degraders}  # since last tick
        self._degraded_totals: dict[str, dict[str, int]] = {}  # pool -> class -> tasks
        self._task: asyncio.Task[None] | None = None
        if restarted:  # deploy called start() once; after a Ray restart nobody does
            self._resume_loop()

    async def start(self) -> None:
        """Start the control loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def _resume_loop(self) -> None:
        """Start the loop from ``__init__``: Ray runs an async actor's ``__init__`` on
        the actor's event loop, so the task can be created at once. Should it ever not,
        the actor asks itself to ``start()`` (that call runs once ``__init__`` returns)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            resume_after_restart("start")
            return
        self._task = loop.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        interval = self.spec.control_interval_s
        while True:
            try:
                await self.tick()
            except Exception as exc:  # a failed tick must not stop the loop
                self._last["_error"] = {"error": repr(exc), "t": time.time()}
            await asyncio.sleep(interval)

    def _host_states(self) -> dict[str, tuple[int, int]]:
        """Per pool, (hosts running, hosts stopping) as Serve reports them; pools Serve
        could not report on are left out. A stopping host is one Serve removes: it
        takes no new batches and drains the ones it holds."""
        try:
            st = serve.status()
        except Exception:
            return {}
        out = {}
        for p in self.spec.pools:
            app = st.applications.get(self.names.pool_app(p.name))
            dep = app.deployments.get(Names.host_deployment(p.name)) if app else None
            if dep is not None:
                states = dep.replica_states
                out[p.name] = (int(states.get("RUNNING", 0)), int(states.get("STOPPING", 0)))
        return out

    async def tick(self) -> list[dict[str, Any]]:
        """One control step for every pool; returns the samples it recorded. What it
        decided is committed to the store (one transaction), also when it failed
        half-way (the pools decided before the failure keep their new state)."""
        now = self._clock()
        samples: list[dict[str, Any]] = []
        try:
            await self._tick(now, samples)
        finally:
            self._save(now, samples)
        return samples

    async def _tick(self, now: float, samples: list[dict[str, Any]]) -> None:
        wall = time.time()
        states = await self._watch_control_actors(now)
        queue_stats = {cap: await self._queue_stats(cap, states) for cap in self._shards}
        self._watch_queues(queue_stats, now)
        await self._watch_budgets(states)
        dispatcher = await self._dispatcher_handle(states)
        disp = await self._call_dispatcher(self._read(dispatcher.stats.remote()))
        # serve.status() blocks on Serve's controller: keep it off this actor's loop.
        hosts = await asyncio.get_running_loop().run_in_executor(None, self._host_states)
        self._hosts.update(hosts)
        for p in self.spec.pools:
            stats = [s for s in queue_stats[p.capability] if isinstance(s, dict)]
            known = len(stats) == len(queue_stats[p.capability])
            # Ready tasks a tenant's in-flight bulkhead holds back wait for that tenant's
            # own tasks, not for agents: neither demand nor work ahead of other tenants.
            held = _per_priority(stats, "held_back_by_priority")
            queued = sum(s["depth"] for s in stats)
            depth = queued - sum(held)
            in_flight = disp.get(p.name, {}).get("in_flight", 0)
            shed = self._take_shed(p.name)
            old = self._agents[p.name]
            decision, self._state[p.name] = decide(
                p.autoscaling,
                ScalingInput(now, old, depth if known else None, in_flight, shed),
                self._state[p.name],
            )
            self._agents[p.name] = decision.agents
            log_scale(p.name, old, decision, depth if known else None, in_flight)
            self._metrics.pool(
                p.name,
                decision.agents,
                disp.get(p.name, {}),
                self._health.pool_status(p.name),
            )
            # The timeline records what Serve reported (the last report if this tick's
            # failed), never the desired count in its place: a trace must show hosts
            # lagging the decision, and a pool with no running host as 0.
            running, stopping = self._hosts.get(p.name, (0, 0))
            if known:
                self._loads[p.name] = self._estimators[p.name].observe(
                    self._rules[p.name],
                    now,
                    wall,
                    [n - h for n, h in zip(_per_priority(stats, "pending_by_priority"), held)],
                    _per_priority(stats, "enqueued_by_priority"),
                    sum(s["acked_total"] for s in stats),
                    disp.get(p.name, {}).get("busy_slot_s", 0.0),
                    disp.get(p.name, {}).get("capacity", 0),
                    self.spec.queues.discipline is Discipline.PRIORITY,
                    down=self._is_down(p.name, hosts, now),
                )
            if p.name in self._degraders:
                self._degrade(p.name, disp.get(p.name, {}), now, wall)
            if known:
                self._metrics.admission(p.name, self._loads[p.name])
            await self._call_dispatcher(
                dispatcher.set_active.remote(
                    p.name, decision.agents, running or p.hosts_for(decision.agents)
                )
            )
            enq = sum(s["enqueued_total"] for s in stats)
            t_prev, enq_prev = self._last_enqueued.get(p.name, (now, enq))
            rate = (enq - enq_prev) / (now - t_prev) if now > t_prev else 0.0
            self._last_enqueued[p.name] = (now, enq)
            sample = {
                "t_s": round(now - self._t0, 3),
                "unix_s": wall,
                "pool": p.name,
                "agents": decision.agents,
                "raw_desired": decision.raw_desired,
                "reason": decision.reason,
                "hosts": running,
                "hosts_stopping": stopping,
                "desired_hosts": p.hosts_for(decision.agents),
                "queue_depth": queued,
                "in_flight": in_flight,
                "oldest_age_s": max((s["oldest_age_s"] for s in stats), default=0.0),
                "arrival_rate_per_s": round(rate, 2),
                "shed": shed,
                "degraded": self._loads[p.name].degraded if p.name in self._loads else None,
                "preempted": disp.get(p.name, {}).get("preempted", 0),
            }
            self._last[p.name] = sample
            self._timeline.append(sample)
            samples.append(sample)

    # -- admission control ------------------------------------------------------------
    async def admission(
        self,
        entry: str,
        admitted: dict[str, int],
        refused: list[tuple[str, int, str, str, int]],
    ) -> tuple[dict[str, PoolLoad], dict[str, float], float]:
        """Every pool's load for an entry point's admission decisions (at most one call
        per control interval from each), its share of what all entry points admit to
        each pool, and this actor's clock (Unix s: the entry point corrects the loads'
        times for its own clock's offset). The call carries what the entry point
        admitted (per pool) and refused since its last call (refusals: (pool,
        priority, reason, tenant label, count))."""
        now = self._clock()
        shares = {
            pool: entries.report(entry, admitted.get(pool, 0), now)
            for pool, entries in self._entries.items()
        }
        for pool, priority, reason, tenant, n in refused:
            if pool not in self._rules or n <= 0:
                continue
            cls = self._rules[pool].classes[priority][0]
            if reason == DEGRADED:  # sent to the pool's fallback: not refused
                self._metrics.degraded(pool, cls, tenant, n)
                per_class = self._degraded_totals.setdefault(pool, {})
                per_class[cls] = per_class.get(cls, 0) + n
                continue
            per = self._shed_totals.setdefault(pool, {}).setdefault(cls, {})
            per[reason] = per.get(reason, 0) + n
            if reason == BULKHEAD:  # one tenant over its limit: no demand for agents
                self._metrics.bulkhead_refused(pool, cls, tenant, n)
                continue
            self._metrics.shed(pool, cls, reason, tenant, n)
            if counts_as_demand(reason):  # demand a bigger pool could have served
                self._shed_new[pool] = self._shed_new.get(pool, 0) + n
        return self._loads, shares, time.time()

    def _degrade(self, pool: str, disp: Mapping[str, Any], now: float, wall: float) -> None:
        """Step ``pool``'s degrade rule on this tick's signals and publish the rule that
        holds in its load (entry points send its new tasks to the fallback)."""
        load = self._loads.get(pool)
        done, failed = disp.get("completed"), disp.get("failed")
        error_rate = None
        if done is not None and failed is not None:
            error_rate = self._error_rates[pool].step(done, failed)
        agents = disp.get("active_agents") or 0
        signals = DegradeSignals(
            predicted_wait_s=None if load is None else predicted_wait_s(load, wall),
            error_rate=error_rate,
            ejected_share=disp.get("ejected_agents", 0) / agents if agents else None,
        )
        degrader = self._degraders[pool]
        before = degrader.rule
        rule = degrader.step(signals, now)
        if load is not None and load.degraded != rule:
            spec = degrader.spec
            self._loads[pool] = dataclasses.replace(
                load,
                degraded=rule,
                fallback=spec.to_pool if rule else None,
                cache_max_age_s=spec.cache_max_age_s if rule and spec.from_cache else None,
            )
        if rule != before:
            log_event(
                CONTROL_LOG,
                logging.WARNING if rule else logging.INFO,
                "pool_degraded" if rule else "pool_recovered",
                pool=pool,
                rule=rule or before,
                to_pool=degrader.spec.to_pool,
            )

    def _is_down(self, pool: str, hosts: dict[str, tuple[int, int]], now: float) -> bool:
        """Whether ``pool`` cannot run anything: Serve has reported no running host for
        it for ``DOWN_AFTER_S`` (not a host starting, replaced or updated)."""
        if pool not in hosts or hosts[pool][0] > 0:
            self._down_since.pop(pool, None)
            return False
        return now - self._down_since.setdefault(pool, now) >= DOWN_AFTER_S

    def _take_shed(self, pool: str) -> int:
        """The refusals reported since the last tick, smoothed over ticks (entry points
        report about once an interval each, not in step with the ticks)."""
        demand = self._shed_demand.setdefault(pool, ShedDemand())
        return demand.take(self._shed_new.pop(pool, 0))

    def _admission_status(self, pool: str) -> dict[str, Any]:
        load = self._loads.get(pool)
        rule = self._rules[pool]
        return {
            "enabled": rule.enabled,
            "max_queue_wait_s": rule.max_queue_wait_s,
            "drain_per_s": None
            if load is None or load.drain_per_s is None
            else round(load.drain_per_s, 1),
            "down": bool(load and load.down),
            "refused": self._shed_totals.get(pool, {}),
            "degraded": load.degraded if load else None,
            "degraded_tasks": self._degraded_totals.get(pool, {}),
        }

    # -- the control plane's own health --------------------------------------------
    async def _watch_control_actors(self, now: float) -> dict[str, dict[str, Any]]:
        """Every control actor's state and restart count (a GCS read, off this actor's
        loop); a restart count that grew logs ``control_actor_restarted``. Empty when
        the read failed (then every actor is called as usual)."""
        read = functools.partial(actor_states, self.spec.namespace, self._control_names)
        try:
            states = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, read), READ_TIMEOUT_S
            )
        except Exception as exc:
            self._last["_control_error"] = {"error": repr(exc), "t": time.time()}
            return {}
        self._last.pop("_control_error", None)
        self._control = states
        self._metrics.control_actors(states)
        events = self._restarts.observe(states, now)
        for event in events:
            self._log_alert(event)
        if events and self._restarts.seen != self._restarts_saved:
            # Saved at once, not at the end of the tick: a controller killed in between
            # would raise the same alert again after its restart.
            self._save(now, [])
        return states

    @staticmethod
    def _is_up(states: Mapping[str, Mapping[str, Any]], name: str) -> bool:
        """Worth calling: ALIVE, or state unknown (the call is bounded by a timeout)."""
        st = states.get(name)
        return st is None or st["state"] == ALIVE

    async def _queue_stats(
        self, cap: str, states: Mapping[str, Mapping[str, Any]]
    ) -> list[Any]:
        """Each shard's stats, or the exception that stands for them (a shard that is
        not ALIVE is not called: its depth is unknown this tick)."""
        calls = []
        for i, shard in enumerate(self._shards[cap]):
            name = self.names.shard(cap, i)
            calls.append(
                self._read(shard.stats.remote())
                if self._is_up(states, name)
                else _unavailable(name, states[name]["state"])
            )
        return await asyncio.gather(*calls, return_exceptions=True)

    @staticmethod
    async def _read(ref: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(ref, READ_TIMEOUT_S)

    async def _dispatcher_handle(self, states: Mapping[str, Mapping[str, Any]]) -> Any:
        """The dispatcher's handle, looked up by name when missing. A dispatcher that is
        not ALIVE fails the tick (agents are held) instead of stalling it."""
        name = self.names.dispatcher
        if not self._is_up(states, name):
            if states[name]["state"] == MISSING:
                self._dispatcher = None  # recreated later under the same name
            raise ControlActorUnavailable(
                f"dispatcher {name} is {states[name]['state']}: agents held until it is back"
            )
        if self._dispatcher is None:
            get = functools.partial(ray.get_actor, name, namespace=self.spec.namespace)
            self._dispatcher = await asyncio.get_running_loop().run_in_executor(None, get)
        return self._dispatcher

    async def _call_dispatcher(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except ray.exceptions.RayActorError:
            # Dead for good (a restart would have waited): look it up again next tick.
            self._dispatcher = None
            raise

    def _save(self, now: float, samples: list[dict[str, Any]]) -> None:
        """Commit this tick (one transaction); a storage failure is reported in
        ``status()`` and does not stop the loop."""
        seen = self._restarts.seen
        changed = seen != self._restarts_saved
        try:
            self._store.save(
                now,
                {p: PoolControl(n, self._state[p]) for p, n in self._agents.items()},
                samples,
                dict(seen) if changed else None,
            )
        except StorageError as exc:
            self._last["_store_error"] = {"error": str(exc), "t": time.time()}
            return
        self._last.pop("_store_error", None)
        if changed:
            self._restarts_saved = dict(seen)

    def _watch_queues(self, queue_stats: dict[str, list[Any]], now: float) -> None:
        """Depth, age and rates per shard and queue; alert rules fire and clear here."""
        for cap, stats in queue_stats.items():
            for st in stats:
                if isinstance(st, dict):
                    self._monitor.observe(cap, st["shard"], st, now)
                    self._metrics.shard(cap, st["shard"], st)
        report = self._monitor.report(now)
        for event in self._alerts.evaluate(self._monitor.observations(now, report), now):
            self._log_alert(event)
        self._health.observe()
        self._metrics.guard(self._health.guard.state.value)
        self._metrics.alerts(self._active_alerts())
        self._queue_report = {q: h.to_dict() for q, h in report.items()}

    def _log_alert(self, event: Any) -> None:
        self._alert_log.append({**dataclasses.asdict(event), "unix_s": time.time()})

    def _active_alerts(self) -> list[Any]:
        """Queue alerts, the fleet cascade alert and control actor restarts: one list
        for status and metrics."""
        return [
            *self._alerts.active(),
            *self._health.active_alerts(),
            *self._restarts.active(),
        ]

    async def host_report(self, pool: str, report: dict[str, Any]) -> dict[str, Any]:
        """A host's periodic report (its agents' health); the reply carries the pool's
        desired host count and the fleet cascade guard's verdict for that host."""
        verdict = self._health.host_report(pool, report)
        return {"desired_hosts": await self.desired_hosts(pool), "health": verdict}

    async def _watch_budgets(
        self, states: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """Spend, burn and alerts from the budget actor (fleets with budgets only)."""
        if not self.spec.budgets.enforced:
            return
        if not self._is_up(states or self._control, self.names.budget):
            return  # restarting: keep the last view rather than wait for it
        try:
            actor = ray.get_actor(self.names.budget, namespace=self.spec.namespace)
            snap, alerts = await asyncio.gather(
                actor.snapshot.remote(), actor.poll_alerts.remote()
            )
        except Exception as exc:  # the actor restarts or is gone: keep the last view
            self._last["_budget_error"] = {"error": repr(exc), "t": time.time()}
            return
        self._budget_snapshot = snap
        self._metrics.budgets(snap)
        self._budget_alerts.extend(alerts)

    async def metrics_text(self) -> str:
        """The fleet's metrics as Ray's metrics agents serve them (every live node's,
        this session's ``ray_fleet_*`` families), in the text exposition format."""
        return await asyncio.get_running_loop().run_in_executor(None, fleet_exposition)

    async def alerts(self) -> dict[str, Any]:
        return {
            "active": [dataclasses.asdict(a) for a in self._active_alerts()],
            "events": list(self._alert_log)[-20:],
        }

    async def desired_hosts(self, pool: str) -> int:
        p = next(p for p in self.spec.pools if p.name == pool)
        return p.hosts_for(self._agents[pool])

    async def agents(self) -> dict[str, int]:
        return dict(self._agents)

    async def timeline(self, since_t_s: float = 0.0) -> list[dict[str, Any]]:
        return [s for s in self._timeline if s["t_s"] >= since_t_s]

    async def status(self) -> dict[str, Any]:
        pools = {**self._last}  # and "_error", if the last tick failed
        pools |= {
            p.name: {
                **self._last.get(p.name, {}),
                "health": self._health.pool_status(p.name),
                "admission": self._admission_status(p.name),
            }
            for p in self.spec.pools
        }
        out = {
            "pools": pools,
            "spec": self.spec.model_dump(mode="json"),
            "queues": getattr(self, "_queue_report", {}),
            "alerts": await self.alerts(),
            "health": self._health.snapshot(),
        }
        if self.spec.budgets.enforced:
            await self._watch_budgets()  # fresh figures, not the last tick's
            out["budgets"] = {
                **(self._budget_snapshot or {}),
                "alert_events": list(self._budget_alerts)[-20:],
            }
        return out
