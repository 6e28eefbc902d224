"""Compute preemption in the simulator (``pools[].preemption``, ``fleet.spec.preemption``).

The live dispatcher's preemption loop (``fleet.runtime.dispatcher``, ``_preempt_loop``)
on virtual time, with its pure parts shared: every ``check_period_s(preempt_after_s)``
(``fleet.policy.preemption``) a pool whose every routable slot is taken (or that holds
its bulkhead's ``max_in_flight``) asks its queue for the highest priority among the
tasks that have waited past ``preempt_after_s`` (a shard's ``urgent``), and
``PreemptionRule.victim`` picks the running task that gives way. The engine cancels
that run (``Simulation.preempt``): the task goes back to the head of its priority in
the queue at once, its delivery refunded, not failed, its agent not blamed, and the
work it had done is lost (it restarts from scratch). How often each task was preempted
travels with it (here a sparse map, live ``Item.preemptions``), so a task preempted
``max_preemptions`` times runs to its end.

Only pools with ``preemption.enabled`` get a ``PoolPreemption``, and its check is an
event every check period, never work per task: a run without preemption is the run it
was before (same events, same report). Preemption needs the ``priority`` discipline
(the spec checks it), so the pool's queue is a ``fleet.sim.overload.PriorityQueue``
whenever tasks have priorities; without priorities no task outranks another and no
check is scheduled.

Differences from live, besides those of the simulator (``fleet/sim/README.md``):

- The cut is immediate. Live, the ask rides on the answer to the host's next progress
  report for the victim's batch (every 0.25 s once a batch has run 0.5 s), and the
  freed slot is kept for the urgent task's shard until it leases; here the engine
  cancels the run at the check and dispatches at once, and the priority queue hands
  the slot to the urgent task (or one of a higher priority). One preemption per check
  per pool, as live has one outstanding at a time.
- The victim is chosen among the runs of routable agents (not draining, not held out by
  their breakers), whose freed slot the urgent task can take. Live, the dispatcher does
  not know which agent runs a task, and ``victim`` reads every task it has sent.
- With agent local queues (``agent_queue_limit`` > 0, a simulator-only model) the queue
  is the pool's only: a task waiting in an agent's local queue is not seen as urgent,
  and the freed slot starts the victim's agent's next local task first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.policy.preemption import PreemptionRule, RunningTask, check_period_s
from fleet.queue.lease_queue import URGENT_SCAN
from fleet.sim.overload import PriorityQueue

if TYPE_CHECKING:
    from fleet.sim.engine import PoolRun, SimAgent, Simulation


class PoolPreemption:
    """One pool's compute preemption: its check, and the runs it preempted."""

    def __init__(self, sim: Simulation, p: PoolRun):
        spec = p.spec.preemption
        self.sim = sim
        self.pool = p
        self.rule = PreemptionRule(sim.scenario.fleet.budgets, spec.max_preemptions)
        self.after_s: float = spec.preempt_after_s
        self.period_s = check_period_s(self.after_s)
        self.counts: dict[int, int] = {}  # task -> times preempted (few tasks: sparse)
        self.preempted = 0  # runs preempted
        self.lost_s = 0.0  # agent-seconds the preempted runs had worked

    def start(self) -> None:
        """Schedule the first check (runs whose tasks have priorities)."""
        if self.sim.prio_on:
            self.sim.schedule(self.period_s, self._check)

    def _check(self, now: float) -> None:
        sim, p = self.sim, self.pool
        if p.queue and not p.partitioned and self._full():
            top = self.urgent(now - self.after_s)
            if top is not None and self.rule.may_preempt(top):
                where: dict[str, tuple[SimAgent, int]] = {}
                victim = self.rule.victim(top, self._running(where))
                if victim is not None:
                    a, tid = where[victim.id]
                    self.counts[tid] = self.counts.get(tid, 0) + 1
                    self.preempted += 1
                    worked = sim.preempt(a, tid, now)
                    self.lost_s += worked
                    sim.log_event(
                        "preempt",
                        pool=p.name,
                        agent=a.id,
                        task=tid,
                        priority=victim.priority,
                        urgent_priority=top,
                        lost_s=worked,
                    )
        if not sim.finished:
            sim.schedule(now + self.period_s, self._check)

    def _full(self) -> bool:
        """No slot for another task: no routable free slot, or the pool's bulkhead
        ``max_in_flight`` held (live: tasks in flight reach the pool's capacity)."""
        p = self.pool
        if not p.free_hosts:
            return True
        gate = p.gate
        return gate is not None and gate.cap is not None and p.held >= gate.cap

    def urgent(self, cutoff_s: float) -> int | None:
        """The highest priority among the queued tasks submitted by ``cutoff_s`` (None:
        none), as a shard's ``LeaseQueue.urgent``: tasks a tenant's in-flight bulkhead
        holds back do not count, and at most ``URGENT_SCAN`` tasks are read. Each
        priority's FIFO is in arrival order (hand-backs at its head are older still),
        and the scan stops at the first task that has not waited long enough, so it
        reads usually one task per priority. (A retried task, which the engine puts at
        its FIFO's tail where a shard keeps submission order, counts once the tasks
        ahead of it have waited long enough too.)"""
        q = self.pool.queue
        assert isinstance(q, PriorityQueue)
        submit = self.sim.submit_t
        gate = self.pool.gate
        limited = gate is not None and gate.bh_in_flight
        scan = URGENT_SCAN
        for prio in range(q.top, -1, -1):
            for tid in q.qs[prio]:
                if submit[tid] > cutoff_s:
                    break
                scan -= 1
                if scan < 0:
                    return None
                if limited and gate.at_limit(gate.tenant(tid)):
                    continue  # held back by its tenant's bulkhead: a slot would not help
                return prio
        return None

    def _running(self, where: dict[str, tuple[SimAgent, int]]) -> list[RunningTask]:
        """The runs of the pool's routable agents as the live dispatcher keeps them
        (sent when they started: tasks start as they are dispatched), each one's agent
        and task in ``where``. O(running): once per check that found an urgent task."""
        sim = self.sim
        prio, started, counts = sim.task_prio, sim.start_t, self.counts
        out = []
        for h in self.pool.hosts:
            for a in h.core.slots.routable:
                for tid in a.running:  # type: ignore[attr-defined]
                    key = str(tid)
                    where[key] = (a, tid)  # type: ignore[assignment]
                    out.append(RunningTask(key, prio[tid], started[tid], counts.get(tid, 0)))
        return out

    def report(self) -> dict[str, Any]:
        """The pool's preemption figures (``preempted`` as ``fleet status`` counts it)."""
        return {
            "preempted": self.preempted,
            "preempted_lost_s": self.lost_s,
            "preempted_tasks": len(self.counts),
            "preempted_max_per_task": max(self.counts.values(), default=0),
        }
