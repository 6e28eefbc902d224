"""Overload in the simulator: priorities, deadlines, admission control, degradation.

The engine (``fleet.sim.engine``) calls into this module only for scenarios whose
workload gives tasks priorities or deadlines, or whose fleet turns on a pool's
``admission`` or declares a ``degrade`` rule: every other run keeps its FIFO queues and
pays one flag test per arrival.

What runs here is fleet's own policy objects, on virtual time:

- ``fleet.policy.admission``: each control interval a pool's ``LoadEstimator`` turns its
  figures (tasks pending by priority, tasks admitted by priority, tasks its agents
  finished, their busy slot-seconds, its serving slots) into a ``PoolLoad``, which one
  ``Admission`` (the simulated fleet has one entry point) decides every arrival on, as a
  live entry point does on the view the controller publishes. Refusals that a bigger
  pool could have served reach the autoscaler through ``ShedDemand``, as live.
- ``fleet.policy.degrade``: each control interval a pool's ``Degrader`` steps on the
  predicted wait of its load, its error rate since the last interval and its share of
  ejected agents; while a rule holds, arrivals for the pool go to its fallback
  (``fallback_of``), are decided by the fallback's admission and marked degraded.
- ``fleet.policy.bulkhead``: a pool's ``max_queued`` and ``max_in_flight`` and each
  tenant's limits (``ShardBulkhead`` of a one-shard pool: the whole limit). A new task
  of a tenant at its queued limit is refused (``bulkhead``; at the pool's, ``full``) and
  its admission withdrawn; the dispatcher holds a tenant's task back (parks it) while
  the tenant has its in-flight limit running, and hands it back to the queue's head as
  one of its runs ends; held-back tasks are left out of admission's load and the
  autoscaler's depth (``held_back``), as the controller does.
- the ``priority`` queue discipline (``PriorityQueue``): higher priorities first, FIFO
  within one, as the live shard's. Tasks whose deadline passed are dropped when the
  dispatcher meets them and by a sweep (outcome ``deadline_exceeded``, no agent time),
  as the live queue drops them at lease and in its sweep; a failed task's time left
  goes to the host core's retry decision (the engine's ``_after_failure``).

Compute preemption, which needs the priority discipline, is ``fleet.sim.preemption``.

Differences from live, besides those of the simulator (``fleet/sim/README.md``): one
entry point (no ``EntryShares``), the load's figures are exact rather than a tick
late, busy slot-seconds are counted when an execution ends (live: the dispatcher's
integral of tasks in flight), and a pool is never ``down``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from fleet.policy.admission import (
    LEVELS,
    Admission,
    AdmissionRule,
    LoadEstimator,
    PoolLoad,
    ShedDemand,
    counts_as_demand,
    predicted_wait_s,
)
from fleet.policy.bulkhead import BULKHEAD, ShardBulkhead, held_back, pool_max_in_flight
from fleet.policy.degrade import Degrader, DegradeSignals, ErrorRate, fallback_of
from fleet.queue.lease_queue import SWEEP_INTERVAL_S
from fleet.sim.outcomes import DEADLINE_EXCEEDED as DEADLINE_CODE
from fleet.spec.queues import Discipline

if TYPE_CHECKING:
    from fleet.sim.engine import PoolRun, Simulation

FULL = "full"  # refused at the pool's bulkhead max_queued (live: the shard is full)


def gates(fleet: Any) -> bool:
    """Whether arrivals pass a gate: a pool's admission control or degrade rule, or a
    bulkhead (the engine then calls ``Overload.admit`` on each)."""
    return fleet.bulkheads.configured or any(
        p.admission.enabled or p.degrade is not None for p in fleet.pools
    )


def _fifos(q: Any) -> list[deque[int]]:
    """The FIFOs of a pool's queue: one per priority, or the queue itself."""
    return q.qs if isinstance(q, PriorityQueue) else [q]


def _pop_overdue(q: Any, deadline: Any, now: float) -> list[int]:
    """Take the tasks past their deadline from the heads of ``q``'s FIFOs. Within one
    FIFO tasks are in arrival order, so with one relative deadline per stream the
    overdue ones are at its head: this costs what it takes."""
    out: list[int] = []
    for dq in _fifos(q):
        while dq and deadline[dq[0]] <= now:
            out.append(dq.popleft())
    if isinstance(q, PriorityQueue):
        q.n -= len(out)
    return out


class PriorityQueue:
    """A pool's queue under the ``priority`` discipline: one FIFO per priority, the
    highest non-empty one served first. The engine's ``deque`` interface (``append``,
    ``appendleft``, ``popleft``, ``q[0]``, ``len``, truth) on task ids whose priorities
    are in ``prio`` (the simulation's per-task table)."""

    __slots__ = ("n", "prio", "qs", "top")

    def __init__(self, prio: bytearray):
        self.prio = prio
        self.qs: list[deque[int]] = [deque() for _ in range(LEVELS)]
        self.n = 0
        self.top = -1  # the highest priority that may hold tasks

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def append(self, tid: int) -> None:
        self._add(tid).append(tid)

    def appendleft(self, tid: int) -> None:
        self._add(tid).appendleft(tid)

    def _add(self, tid: int) -> deque[int]:
        """The FIFO of ``tid``'s priority, counted as holding one more task."""
        p = self.prio[tid]
        self.n += 1
        if p > self.top:
            self.top = p
        return self.qs[p]

    def _head(self) -> deque[int]:
        qs, top = self.qs, self.top
        while not qs[top]:
            top -= 1
        self.top = top
        return qs[top]

    def __getitem__(self, k: int) -> int:
        if k != 0 or not self.n:
            raise IndexError("a priority queue shows only its head")
        return self._head()[0]

    def popleft(self) -> int:
        if not self.n:
            raise IndexError("pop from an empty queue")
        self.n -= 1
        return self._head().popleft()

    def by_priority(self) -> list[int]:
        return [len(q) for q in self.qs]


class PoolGate:
    """One pool's admission and degradation state, and its per-class figures."""

    def __init__(self, sim: Simulation, p: PoolRun):
        spec = p.spec
        budgets = sim.scenario.fleet.budgets
        self.rule = AdmissionRule.of(spec.admission, budgets)
        self.estimator = LoadEstimator()
        self.degrader = Degrader(spec.name, spec.degrade) if spec.degrade else None
        self.shed_demand = ShedDemand()
        self.by_priority = (
            sim.scenario.fleet.queues.discipline is Discipline.PRIORITY and sim.prio_on
        )
        self.admitted = [0] * LEVELS  # tasks admitted (queued here), by priority
        self.dropped = 0  # tasks the queue dropped past their deadline (no agent time)
        self.shed_new = 0  # refusals a bigger pool could have served, since the last tick
        self.error_rate = ErrorRate(0, 0)  # since the last control tick
        # per class (index into sim.class_names)
        n = len(sim.class_names)
        self.offered = [0] * n
        self.refused: list[dict[str, int]] = [{} for _ in range(n)]
        self.degraded_out = [0] * n  # meant for this pool, sent to its fallback
        self.degraded_in = [0] * n  # sent here by another pool's degrade rule
        self.completed = [0] * n
        self.good = [0] * n  # completed by their deadline (all completed: no deadline)
        self.lat: list[list[float]] = [[] for _ in range(n)]
        self.degraded_s = 0.0  # time a degrade rule held
        self.degraded_since: float | None = None
        self.transitions: list[dict[str, Any]] = []
        # Bulkheads (``bulkheads:``): the pool's limits and every tenant's, as one shard
        # of one enforces them (the simulated pool has one queue: the whole limit).
        self.sim = sim
        bulkheads = sim.scenario.fleet.bulkheads
        bh = ShardBulkhead.of(bulkheads, spec.name, 1, 0)
        self.cap = pool_max_in_flight(bulkheads, spec.name)
        self.bh: ShardBulkhead | None = (
            bh if bh.limits_tenants or bh.max_queued is not None or self.cap else None
        )
        self.bh_in_flight = self.bh is not None and (
            self.cap is not None
            or any(lim[1] is not None for lim in (bh.tenant, *bh.tenants.values()))
        )
        self.pending_t: dict[str, int] = {}  # per tenant: queued, held or parked
        self.leased_t: dict[str, int] = {}  # per tenant: held by agents
        self.peak_leased_t: dict[str, int] = {}
        self.parked: dict[str, deque[int]] = {}  # per tenant: held back at its limit
        self.parked_now = 0
        self.parked_total = 0
        self.refused_t: dict[str, int] = {}  # per tenant: refused at its max_queued

    # -- bulkheads (engine hooks; only with ``bh``) -------------------------------------
    def tenant(self, tid: int) -> str:
        sim = self.sim
        return sim.tenants[sim.task_tenant[tid]][0]

    def refuses(self, tenant: str) -> str | None:
        """Why a new task of ``tenant`` cannot be queued here (None: it can): the
        pool's ``max_queued`` (``full``) or the tenant's (``bulkhead``)."""
        bh = self.bh
        assert bh is not None
        if bh.max_queued is not None and sum(self.pending_t.values()) >= bh.max_queued:
            return FULL
        lim = bh.queued_limit(tenant)
        if lim is not None and self.pending_t.get(tenant, 0) >= lim:
            return BULKHEAD
        return None

    def queued(self, tid: int) -> None:
        t = self.tenant(tid)
        self.pending_t[t] = self.pending_t.get(t, 0) + 1

    def recorded(self, tid: int) -> None:
        t = self.tenant(tid)
        self.pending_t[t] -= 1

    def room(self, p: PoolRun) -> int:
        """Tasks the dispatcher may still hand out under the pool's ``max_in_flight``."""
        return len(p.queue) if self.cap is None else self.cap - p.held

    def at_limit(self, tenant: str) -> bool:
        """Whether ``tenant`` has its in-flight limit leased: its next task is held
        back (and does not count as urgent for preemption, as a shard's ``urgent``)."""
        assert self.bh is not None
        lim = self.bh.in_flight_limit(tenant)
        return lim is not None and self.leased_t.get(tenant, 0) >= lim

    def park(self, q: Any) -> bool:
        """Hold the queue's head back if its tenant has its in-flight limit leased."""
        tid = q[0]
        t = self.tenant(tid)
        if not self.at_limit(t):
            return False
        q.popleft()
        self.parked.setdefault(t, deque()).append(tid)
        self.parked_now += 1
        self.parked_total += 1
        return True

    def leased_one(self, tid: int) -> None:
        t = self.tenant(tid)
        n = self.leased_t[t] = self.leased_t.get(t, 0) + 1
        if n > self.peak_leased_t.get(t, 0):
            self.peak_leased_t[t] = n

    def unleased(self, tid: int, q: Any) -> None:
        """An execution of ``tid`` ended (or its agent handed it back): its tenant has
        room again, and its oldest parked task goes back to the queue's head."""
        t = self.tenant(tid)
        self.leased_t[t] -= 1
        parked = self.parked.get(t)
        if parked:
            q.appendleft(parked.popleft())
            self.parked_now -= 1

    def held_back(self, q: Any, prio: bytearray | None) -> list[int]:
        """By priority, the ready tasks tenants' in-flight limits hold back
        (``fleet.policy.bulkhead.held_back``), from the queue and the parked tasks
        (O(queued): once per control interval)."""
        bh = self.bh
        if bh is None or not self.bh_in_flight:
            return [0] * LEVELS
        ready: dict[str, list[int]] = {}
        limited = {t for t in self.pending_t if bh.in_flight_limit(t) is not None}
        if not limited:
            return [0] * LEVELS
        for dq in [*_fifos(q), *self.parked.values()]:
            for tid in dq:
                t = self.tenant(tid)
                if t in limited:
                    by_p = ready.get(t)
                    if by_p is None:
                        by_p = ready[t] = [0] * LEVELS
                    by_p[prio[tid] if prio else 0] += 1
        return held_back(ready, self.leased_t, bh.in_flight_limit)


class Overload:
    """The simulation's admission, degradation and per-class accounting."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.admission = Admission(sim.clock)
        self.loads: dict[str, PoolLoad] = {}
        self.gated = gates(sim.scenario.fleet)

    def start(self) -> None:
        """Schedule the queues' sweeps of overdue tasks (runs with deadlines)."""
        if self.sim.deadline_on:
            self.sim.schedule(SWEEP_INTERVAL_S, self._sweep)

    def _sweep(self, now: float) -> None:
        """Drop the queued tasks past their deadline, as a live shard's sweep does every
        ``SWEEP_INTERVAL_S`` (the dispatcher also drops any it meets)."""
        sim = self.sim
        deadline = sim.task_deadline
        for p in sim.pools:
            for tid in _pop_overdue(p.queue, deadline, now):
                self.drop(p, tid, now)
            for dq in p.gate.parked.values():  # held back by a bulkhead: pending too
                late = _pop_overdue(dq, deadline, now)
                p.gate.parked_now -= len(late)
                for tid in late:
                    self.drop(p, tid, now)
        if not sim.finished:
            sim.schedule(now + SWEEP_INTERVAL_S, self._sweep)

    def drop(self, p: PoolRun, tid: int, now: float) -> None:
        """Task ``tid``, queued on ``p``, is past its deadline: the queue fails it with
        ``deadline_exceeded`` (no agent time), as live."""
        p.gate.dropped += 1
        self.sim._record(tid, DEADLINE_CODE, now)

    # -- arrivals ----------------------------------------------------------------------
    def admit(
        self, p: PoolRun, prio: int, deadline: float, cls: int, tenant: int
    ) -> PoolRun | None:
        """The pool a new task of ``p`` is queued on (``p``, or its fallback while ``p``
        is degraded), or None when admission control refuses it."""
        gate = p.gate
        gate.offered[cls] += 1
        adm = self.admission
        meant = None
        if adm.degrading:
            degraded = adm.degraded()
            if p.name in degraded:
                rules = {k: v[0] for k, v in degraded.items()}
                to = {k: v[1] for k, v in degraded.items()}
                name, rule = fallback_of(p.name, rules, to)
                if rule is not None:
                    meant, p = p, self.sim.pool_by_name[name]
        # A refusal is counted as an entry point counts it (``take_counts``), with the
        # pool the task was meant for in place of its tenant: ``_collect`` hands the
        # demand to the pool that refused it and the figures to the pool it was for.
        v = adm.decide(
            p.name, prio, None if math.isinf(deadline) else deadline, (meant or p).name
        )
        if not v.admitted:
            return None
        gate = p.gate
        if gate.bh is not None:
            name = self.sim.tenants[tenant][0]
            why = gate.refuses(name)
            if why is not None:  # the shard refuses it: the admission is taken back
                adm.withdraw(p.name, prio)
                per = (meant or p).gate.refused[cls]
                per[why] = per.get(why, 0) + 1
                gate.refused_t[name] = gate.refused_t.get(name, 0) + 1
                return None
        gate.admitted[prio] += 1
        if meant is not None:
            meant.gate.degraded_out[cls] += 1
            p.gate.degraded_in[cls] += 1
        return p

    def _collect(self) -> None:
        """Take the refusals counted since the last call: demand for the pool that
        refused them (``counts_as_demand``), figures for the pool they were meant for."""
        sim = self.sim
        for (pool, prio, reason, meant), n in self.admission.take_counts().items():
            if counts_as_demand(reason):
                sim.pool_by_name[pool].gate.shed_new += n
            per = sim.pool_by_name[meant].gate.refused[sim.class_of[prio]]
            per[reason] = per.get(reason, 0) + n

    # -- outcomes ----------------------------------------------------------------------
    def outcome(self, p: PoolRun, tid: int, ok: bool, t: float) -> None:
        """A recorded outcome of task ``tid`` (queued on ``p``)."""
        sim = self.sim
        gate = p.gate
        if gate.bh is not None:
            gate.recorded(tid)
        cls = sim.class_of[sim.task_prio[tid]] if sim.prio_on else 0
        if not ok:
            return
        gate.completed[cls] += 1
        if not sim.deadline_on or t <= sim.task_deadline[tid]:
            gate.good[cls] += 1
        sub = sim.submit_t[tid]
        if sub >= sim.warmup_s:
            gate.lat[cls].append(t - sub)

    # -- control ticks -----------------------------------------------------------------
    def tick(self, p: PoolRun, t: float) -> tuple[int, int]:
        """``p``'s control step: publish its load, step its degrade rule; returns the
        shed demand and the queue depth for its autoscaler. Tasks a tenant's in-flight
        bulkhead holds back are neither demand nor work ahead of other tenants (as the
        controller leaves out a shard's ``held_back_by_priority``)."""
        gate = p.gate
        held = gate.held_back(p.queue, self.sim.task_prio if self.sim.prio_on else None)
        pending = [n - h for n, h in zip(self._pending(p), held)]
        slots = len(p.active) * p.concurrency
        if gate.cap is not None:
            slots = min(slots, gate.cap)
        load = gate.estimator.observe(
            gate.rule,
            t,
            t,
            pending,
            gate.admitted,
            p.completed + p.failed - gate.dropped,
            p.busy_s,
            slots,
            gate.by_priority,
        )
        if gate.degrader is not None:
            rule = self._degrade(p, load, t)
            if rule is not None:
                load = dataclasses.replace(
                    load, degraded=rule, fallback=gate.degrader.spec.to_pool
                )
        self.loads[p.name] = load
        self.admission.update(self.loads)
        self._collect()
        n, gate.shed_new = gate.shed_new, 0
        return gate.shed_demand.take(n), len(p.queue) + gate.parked_now - sum(held)

    def _pending(self, p: PoolRun) -> list[int]:
        """Tasks queued or held by the pool's agents, by priority (O(agents + held):
        once per control interval)."""
        sim = self.sim
        gate = p.gate
        if not sim.prio_on:
            return [len(p.queue) + p.held + gate.parked_now] + [0] * (LEVELS - 1)
        q = p.queue
        out = q.by_priority() if isinstance(q, PriorityQueue) else [0] * LEVELS
        prio = sim.task_prio
        if not isinstance(q, PriorityQueue):
            for tid in q:
                out[prio[tid]] += 1
        for parked in gate.parked.values():
            for tid in parked:
                out[prio[tid]] += 1
        for h in p.hosts:
            for a in h.core.agents:
                for tid in a.running:
                    out[prio[tid]] += 1
                for tid in a.local or ():
                    out[prio[tid]] += 1
        return out

    def _degrade(self, p: PoolRun, load: PoolLoad, t: float) -> str | None:
        gate = p.gate
        deg = gate.degrader
        assert deg is not None
        active = len(p.active)
        signals = DegradeSignals(
            predicted_wait_s=predicted_wait_s(load, t),
            # The agents' outcomes: the queue's deadline drops took no agent's time.
            error_rate=gate.error_rate.step(p.completed, p.failed - gate.dropped),
            ejected_share=p.n_ejected / active if active else None,
        )
        before = deg.rule
        rule = deg.step(signals, t)
        if rule != before:
            gate.transitions.append(
                {
                    "t_s": t,
                    "rule": rule or before,
                    "event": "degraded" if rule else "recovered",
                }
            )
            if rule:
                gate.degraded_since = t
            elif gate.degraded_since is not None:
                gate.degraded_s += t - gate.degraded_since
                gate.degraded_since = None
        return rule

    # -- the report --------------------------------------------------------------------
    def report(self, p: PoolRun, arrivals_s: float) -> dict[str, Any]:
        """``p``'s overload figures: per class offered, refused (by reason), degraded,
        completed, goodput and latency; goodput per second over ``arrivals_s`` and as a
        share of the pool's capacity (``max_agents`` x concurrency / mean service)."""
        from fleet.sim.report import latency_summary
        from fleet.sim.scenario import mean_duration_s

        sim = self.sim
        self._collect()
        gate = p.gate
        svc = mean_duration_s(p.model.service)
        capacity = p.scaling.max_agents * p.concurrency / svc if svc else None
        classes: dict[str, Any] = {}
        for c, name in enumerate(sim.class_names):
            offered = gate.offered[c]
            if not (offered or gate.degraded_in[c] or gate.completed[c]):
                continue
            refused = dict(sorted(gate.refused[c].items()))
            n_ref = sum(refused.values())
            classes[name] = {
                "offered": offered,
                "refused": refused,
                "shed_share": n_ref / offered if offered else 0.0,
                "degraded": gate.degraded_out[c],
                "degraded_share": gate.degraded_out[c] / offered if offered else 0.0,
                "degraded_in": gate.degraded_in[c],
                "completed": gate.completed[c],
                "goodput": gate.good[c],
                "latency_s": latency_summary(sorted(gate.lat[c])),
            }
        good = sum(gate.good)
        offered = sum(gate.offered)
        refused_n = sum(sum(r.values()) for r in gate.refused)
        per_s = good / arrivals_s if arrivals_s > 0 else 0.0
        degraded_s = gate.degraded_s
        if gate.degraded_since is not None:
            degraded_s += sim.end_t - gate.degraded_since
        out: dict[str, Any] = {}
        if gate.bh is not None:
            out["bulkheads"] = {
                "max_queued": gate.bh.max_queued,
                "max_in_flight": gate.cap,
                "refused_by_tenant": dict(sorted(gate.refused_t.items())),
                "peak_in_flight_by_tenant": dict(sorted(gate.peak_leased_t.items())),
                "held_back_total": gate.parked_total,
            }
        return out | {
            "admission": gate.rule.enabled,
            "offered": offered,
            "admitted": sum(gate.admitted),
            "refused": refused_n,
            "shed_share": refused_n / offered if offered else 0.0,
            "degraded": sum(gate.degraded_out),
            "degraded_share": sum(gate.degraded_out) / offered if offered else 0.0,
            "deadline_dropped": gate.dropped,
            "goodput": good,
            "goodput_per_s": per_s,
            "capacity_per_s": capacity,
            "goodput_share": per_s / capacity if capacity else None,
            "degraded_s": degraded_s,
            "degrade_transitions": gate.transitions,
            "classes": classes,
        }
