"""Dispatcher: moves leased work from queue shards to pools, and outcomes to the ledger.

Per pool and shard, a loop leases a batch only when the pool has free capacity (active
agents x concurrency minus tasks in flight), and sends it through the pool's Serve
handle; the host records each outcome in the ledger as its task finishes, and the
dispatcher acks an item only once it is recorded: from the host's reply, or earlier
from its progress reports. Acks go to each shard coalesced (``ACK_COALESCE_S``). So a
crash at any point leaves an item either acked with a recorded outcome, or still leased
and redelivered when its lease expires: at-least-once execution, exactly-once recording
(the ledger keeps the first outcome per id).

A batch whose host dies is settled at once, not left to expire: the ledger says which
of its items were recorded before the crash (acked: never run again); the rest are
nacked as *crashed* (``LeaseQueue.nack``), so they come back in smaller batches and a
task that kills every host it runs on fails alone (``host_crash``). Every nack and
renewal names the delivery it concerns (fencing): one for a delivery that was since
leased again is ignored by the queue. Acks need no fence (the outcome is recorded).
A batch's items count against the pool's capacity until they finish: a host running a
batch for longer than a moment reports how many of its items are done
(``batch_progress``), so one slow item does not hold the slots of the whole batch.

Restart: the dispatcher holds its leases under a stable holder name (its actor name),
so when Ray restarts it (``fleet.runtime.lifecycle``) the new instance *adopts* its
predecessor's leases instead of letting them expire and rerun: it asks every shard for
the ids leased to it and keeps renewing them (without counting them against the pool's
capacity: those that ran nowhere must not stall new work), acks those whose
outcome the ledger holds (finished before or after the kill), keeps the ones a host
reports still running (hosts report their long batches' ids when the dispatcher does not
know the batch, see ``batch_progress``) until they are recorded, and only hands the rest
back to the queue: items that were leased but were not running anywhere. A restarted
shard likewise asks the dispatcher what it holds (``held_ids``).

Retries: the host does not record a failure its retry policy wants retried; it returns
the item's id with a backoff delay instead. The dispatcher acks the rest, keeps that
item leased (and its lease renewed) for the delay, then nacks it, so the queue hands it
out again, possibly to another host. Only the final failure is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from typing import Any

import ray
from ray import serve

from fleet.policy.backoff import attempt_state, backoff_wait
from fleet.policy.bulkhead import pool_max_in_flight
from fleet.policy.preemption import PreemptionRule, RunningTask, check_period_s
from fleet.runtime.ledger import LedgerClient
from fleet.runtime.lifecycle import on_start, resume_after_restart
from fleet.runtime.names import Names
from fleet.spec.backoff import BackoffSpec
from fleet.spec.fleet import FleetSpec
from fleet.spec.pools import PoolSpec
from fleet.task import Item

IDLE_BACKOFF_MIN_S = 0.001
IDLE_BACKOFF_MAX_S = 0.05
# A shard loop whose lease calls come back empty polls less and less often, up to
# IDLE_BACKOFF_MAX_S (fleet's one backoff rule, no jitter: one loop per shard).
IDLE_BACKOFF = BackoffSpec(
    initial_backoff_s=IDLE_BACKOFF_MIN_S, max_backoff_s=IDLE_BACKOFF_MAX_S, jitter_ratio=0.0
)
# Empty polls in a row after which the wait is IDLE_BACKOFF_MAX_S.
IDLE_POLLS_TO_CAP = math.ceil(math.log2(IDLE_BACKOFF_MAX_S / IDLE_BACKOFF_MIN_S)) + 1
LEASE_RENEW_FRACTION = 1 / 3
RETRY_COALESCE_S = 0.02  # retries due within this of each other go back in one nack
HOST_REPORT_TTL_S = 30.0  # a host silent this long no longer counts in pool status
# Adoption after a restart: the ledger is polled every ADOPT_POLL_S; an adopted item
# that is neither recorded nor reported running by a host after ADOPT_DECIDE_S was not
# running anywhere and goes back to the queue. One reported running goes back only if
# it is still unrecorded after the task timeout plus ADOPT_MARGIN_S (its host died).
ADOPT_POLL_S = 0.5
ADOPT_DECIDE_S = 3.0
ADOPT_MARGIN_S = 30.0
ACK_COALESCE_S = 0.005  # acks to a shard go out together, this long after the first
ACK_MAX_IDS = 2048
CRASH_LEDGER_S = 10.0  # how long a crashed batch waits for the ledger's word
# Preemption: how long an ask may go unanswered (its batch ended first) before another
# task may be preempted. How often a full pool looks for an urgent task is the
# simulator's too: ``fleet.policy.preemption.check_period_s``.
PREEMPT_ANSWER_S = 10.0
_NOT_HELD = -1


class _PoolState:
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, n: int) -> None:
        # Changes per batch (sent, progress, settled), not per task.
        now = time.monotonic()
        self._busy_slot_s += self._in_flight * (now - self._since)
        self._since = now
        self._in_flight = n

    def busy_slot_s(self) -> float:
        """Slot-seconds spent in flight since this dispatcher started: with the tasks
        completed meanwhile, the pool's time per task (admission control's drain rate,
        ``fleet.policy.admission.LoadEstimator``)."""
        return self._busy_slot_s + self._in_flight * (time.monotonic() - self._since)

    def __init__(
        self,
        spec: PoolSpec,
        shards: list[Any],
        handle: Any,
        max_in_flight: int | None = None,
        preemption: PreemptionRule | None = None,
    ):
        self.spec = spec
        # Preemption (pools[].preemption): what runs, by id -> (task, batch id); the
        # one preemption asked and not yet sent with a progress answer to its host, and
        # those sent whose batches still run. How often a task was preempted travels
        # with it (``Item.preemptions``, kept by its shard), not here: it outlives us.
        self.preemption = preemption
        self.running: dict[str, tuple[RunningTask, int]] = {}
        self.ask: tuple[int, str, float] | None = None  # (batch, id, asked), not yet sent
        self.preempting: set[str] = set()  # asks sent to hosts, their batches running
        self.preempted_total = 0  # runs preempted (the host cancelled them)
        # Tasks the pool's hosts completed and failed (a degrade rule's error rate).
        self.outcomes = [0, 0]
        # The slot a preemption frees is kept for the shard holding the urgent task
        # (priority order is per shard): (shard, its priority, since), until it leases.
        self.urgent: tuple[int, int, float] | None = None
        self.max_in_flight = max_in_flight  # the pool's bulkhead (None: its agents' slots)
        self.shards = shards
        self.handle = handle
        self.active_agents = spec.autoscaling.start_agents
        self.hosts = spec.hosts_for(self.active_agents)
        self._in_flight = 0
        self._busy_slot_s = 0.0  # the integral of in_flight over time, to _since
        self._since = time.monotonic()
        self.reserved = 0  # slots the shard loops may fill with the leases they await
        self.depth: list[int] = [0] * len(shards)
        self.room = asyncio.Event()
        self.sent_batches = 0
        self.sent_items = 0
        self.host_failures = 0
        self.retried_items = 0
        self.retry_waiting = 0  # items waiting out their backoff before the nack
        self.hosts_seen: dict[str, tuple[float, dict[str, Any]]] = {}  # host -> (t, stats)
        self.open_batches: dict[int, list[int]] = {}  # batch id -> [freed early, shard]
        # Leased ids per shard -> their delivery number (None: adopted, number unknown).
        self.held: list[dict[str, int | None]] = [{} for _ in shards]
        self.acks: list[list[str]] = [[] for _ in shards]  # recorded, ack pending
        self.ack_timers: list[asyncio.TimerHandle | None] = [None] * len(shards)
        self.crashed_batches = 0  # batches whose host process died while it held them
        self.crash_recorded = 0  # items of failed batches the ledger had: not rerun
        self.adopted: dict[str, int] = {}  # predecessor's leased ids -> shard index
        self.reported_running: set[str] = set()  # adopted ids a host says it runs
        self.adopted_total = 0
        self.adopted_acked = 0
        self.adopted_requeued = 0

    @property
    def capacity(self) -> int:
        """Tasks the pool may hold: its active agents' slots, but no more than its
        running hosts can run. While new hosts start, the rest of the work stays in the
        queue, where any host can take it, instead of waiting inside a host that Serve
        may remove (which would then have to finish it within its drain timeout or
        hand it back). A pool bulkhead (``bulkheads.pools.<pool>.max_in_flight``) caps
        it."""
        agents = min(self.active_agents, self.hosts * self.spec.agents_per_host)
        slots = agents * self.spec.concurrency_per_agent
        return slots if self.max_in_flight is None else min(slots, self.max_in_flight)

    @property
    def per_host_agents(self) -> int:
        return -(-self.active_agents // max(1, self.hosts))

    @property
    def host_slots(self) -> int:
        """Tasks one host runs at once: its share of the active agents' slots."""
        return max(1, self.per_host_agents * self.spec.concurrency_per_agent)


@ray.remote(num_cpus=0, max_concurrency=10_000)
class Dispatcher:
    def __init__(self, spec: dict[str, Any], adopt: bool = False):
        """``adopt``: take over the leases of a predecessor, as after a restart
        (``fleet apply`` replaces the dispatcher this way)."""
        self.spec = FleetSpec.model_validate(spec)
        self.names = Names(self.spec.name)
        # Stable across restarts: a restarted dispatcher finds its predecessor's leases.
        self.holder = self.names.dispatcher
        self._pools: dict[str, _PoolState] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._running = False
        # Random start: a restarted dispatcher's ids do not collide with batches of its
        # predecessor that hosts may still be running (they tell them apart by id).
        self._batch_ids = itertools.count(uuid.uuid4().int >> 80)
        self._ledger = LedgerClient.for_spec(self.spec)
        self.restarted = on_start(self.spec.namespace, self.names.dispatcher)
        self._adopting = self.restarted or adopt
        if self.restarted:
            resume_after_restart("start")  # nobody else calls start() after a restart

    async def start(self) -> None:
        if self._running:
            return
        for p in self.spec.pools:
            shards = [
                ray.get_actor(self.names.shard(p.capability, i), namespace=self.spec.namespace)
                for i in range(self.spec.queues.shards)
            ]
            handle = serve.get_deployment_handle(
                Names.host_deployment(p.name), self.names.pool_app(p.name)
            )
            rule = (
                PreemptionRule(self.spec.budgets, p.preemption.max_preemptions)
                if p.preemption.enabled
                else None
            )
            self._pools[p.name] = _PoolState(
                p, shards, handle, pool_max_in_flight(self.spec.bulkheads, p.name), rule
            )
        self._running = True
        loop = asyncio.get_running_loop()
        if self._adopting:
            await self._adopt()
        self._loops = [
            loop.create_task(self._shard_loop(ps, s))
            for ps in self._pools.values()
            for s in range(len(ps.shards))
        ]
        self._loops.append(loop.create_task(self._renew_leases()))
        self._loops += [
            loop.create_task(self._settle_adopted(ps))
            for ps in self._pools.values()
            if ps.adopted
        ]
        self._loops += [
            loop.create_task(self._preempt_loop(ps))
            for ps in self._pools.values()
            if ps.preemption is not None
        ]

    async def _adopt(self) -> None:
        """Take over the leases the shards hold for this dispatcher's name."""
        for ps in self._pools.values():
            answers = await asyncio.gather(
                *(sh.leased_to.remote(self.holder) for sh in ps.shards), return_exceptions=True
            )
            for s, ids in enumerate(answers):
                if isinstance(ids, BaseException):
                    continue  # that shard's leases expire and are redelivered instead
                # Not counted in flight: those that ran nowhere (their batch died with
                # the old dispatcher) would hold the pool's capacity until they are
                # requeued; those that run finish at the pace of their hosts, which at
                # worst queue a little more work meanwhile.
                for i in ids:
                    ps.held[s][i] = None  # delivery unknown: renewals are not fenced
                    ps.adopted[i] = s
                ps.adopted_total += len(ids)

    async def _settle_adopted(self, ps: _PoolState) -> None:
        """Ack adopted items once recorded; requeue the ones nothing runs (see the
        module docstring)."""
        t0 = time.monotonic()
        decide_at = t0 + ADOPT_DECIDE_S
        give_up_at = (
            t0
            + self.spec.resilience.task_timeout_s
            + self.spec.health.hung_task_grace_s
            + ADOPT_MARGIN_S
        )
        while ps.adopted and self._running:
            await asyncio.sleep(ADOPT_POLL_S)
            ids = list(ps.adopted)
            try:
                missing = set(await self._ledger.missing_async(ids))
            except ray.exceptions.RayError:
                continue
            now = time.monotonic()
            # An id whose adopted lease lapsed and that was leased again since is held
            # for that delivery now: no longer adopted, not ours to settle here.
            for i in [i for i in ids if ps.held[ps.adopted[i]].get(i, _NOT_HELD) is not None]:
                del ps.adopted[i]
                ps.reported_running.discard(i)
            ids = [i for i in ids if i in ps.adopted]
            done = [i for i in ids if i not in missing]
            stale = (
                []
                if now < decide_at
                else [
                    i
                    for i in ids
                    if i in missing and (now >= give_up_at or i not in ps.reported_running)
                ]
            )
            for group, how in ((done, "ack"), (stale, "nack")):
                by_shard: dict[int, list[str]] = {}
                unstarted: list[str] = []  # nothing reported them running
                for i in group:
                    by_shard.setdefault(ps.adopted.pop(i), []).append(i)
                    if i not in ps.reported_running:
                        unstarted.append(i)
                    ps.reported_running.discard(i)
                for s, part in by_shard.items():
                    try:
                        if how == "ack":
                            await ps.shards[s].ack.remote(part)
                            ps.adopted_acked += len(part)
                        else:
                            await ps.shards[s].nack.remote(part, "dispatcher restarted")
                            ps.adopted_requeued += len(part)
                    except ray.exceptions.RayError:
                        pass  # the leases expire and the items are redelivered
                    finally:
                        for i in part:
                            ps.held[s].pop(i, None)
                if how == "nack" and unstarted:
                    try:  # not running anywhere: their next run is no duplicate
                        await self._ledger.record_async([], excused=unstarted)
                    except ray.exceptions.RayError:
                        pass  # counted as duplicates instead: over-, never under-counting

    async def held_ids(self, capability: str, shard: int) -> list[tuple[str, int | None]]:
        """(id, delivery) of what this dispatcher holds leased from one shard: a
        restarted shard leases them back to it, as those deliveries, instead of
        delivering them again."""
        for ps in self._pools.values():
            if ps.spec.capability == capability and shard < len(ps.held):
                return list(ps.held[shard].items())
        return []

    async def stop(self) -> None:
        self._running = False
        for t in self._loops:
            t.cancel()

    async def set_active(self, pool: str, agents: int, hosts: int) -> None:
        """The controller's decision: run ``agents`` logical agents on ``hosts`` hosts."""
        ps = self._pools[pool]
        ps.active_agents = agents
        ps.hosts = max(1, hosts)
        ps.room.set()

    async def batch_progress(
        self,
        pool: str,
        done: dict[int, int],
        running: dict[int, list[str]] | None = None,
        recorded: dict[int, list[str]] | None = None,
    ) -> list[Any]:
        """A host's report that ``done[batch]`` items of each listed batch have finished
        and that the ``recorded[batch]`` ids are recorded.

        Finished items' agent slots are free, so they stop counting against the pool's
        capacity now rather than when the batch's slowest item finishes; recorded ones
        are acked now.

        Returns [the batches this dispatcher does not know while it adopts a
        predecessor's leases: the host then sends their item ids as ``running``, and
        those items are kept leased until they are recorded instead of being requeued;
        the items of the reported batches to preempt, by batch].
        """
        ps = self._pools.get(pool)
        if ps is None:
            return [[], {}]
        for ids in (running or {}).values():
            ps.reported_running.update(i for i in ids if i in ps.adopted)
        freed_any = False
        unknown = []
        for bid, n in done.items():
            b = ps.open_batches.get(bid)
            if b is None:
                unknown.append(bid)
            elif n > b[0]:
                ps.in_flight -= n - b[0]
                b[0] = n
                freed_any = True
        for bid, ids in (recorded or {}).items():
            b = ps.open_batches.get(bid)
            if b is not None:
                self._ack(ps, b[1], ids)
                for i in ids:
                    ps.running.pop(i, None)
        if freed_any:
            ps.room.set()
        asks: dict[int, list[str]] = {}
        if ps.ask is not None and ps.ask[0] in done:
            bid, i, _ = ps.ask
            asks[bid] = [i]
            ps.ask = None
            ps.preempting.add(i)
        return [unknown if ps.adopted else [], asks]

    async def stats(self) -> dict[str, Any]:
        return {
            name: {
                "active_agents": ps.active_agents,
                "hosts": ps.hosts,
                "in_flight": ps.in_flight,
                "busy_slot_s": ps.busy_slot_s(),
                "capacity": ps.capacity,
                "sent_batches": ps.sent_batches,
                "sent_items": ps.sent_items,
                "host_failures": ps.host_failures,
                "retried_items": ps.retried_items,
                "retry_waiting": ps.retry_waiting,
                "crashed_batches": ps.crashed_batches,
                "crash_recorded": ps.crash_recorded,
                "adopted": ps.adopted_total,
                "adopted_acked": ps.adopted_acked,
                "adopted_requeued": ps.adopted_requeued,
                "adopting": len(ps.adopted),
                "preempted": ps.preempted_total,
                **_breaker_summary(ps),
            }
            for name, ps in self._pools.items()
        }

    async def _shard_loop(self, ps: _PoolState, s: int) -> None:
        """Feed the pool from shard ``s`` while the pool has free slots.

        One loop per shard, so every shard is polled at the pace of its own lease calls:
        a single loop choosing "the deepest shard it knew of" kept choosing a shard that
        always had new arrivals and starved one whose last known depth was 0 (measured:
        p95 0.5 s of queue wait at 10% load). The loops share the pool's capacity: each
        reserves the slots it may fill before its lease call and returns what it did not
        use, so together they never lease more than the pool's free slots.
        """
        idle_wait = backoff_wait(IDLE_BACKOFF, None)
        idle = 0  # empty lease calls in a row
        max_items = self.spec.queues.batch.max_items
        while self._running:
            free = ps.capacity - ps.in_flight - ps.reserved
            if ps.urgent is not None and ps.urgent[0] != s:
                free -= 1  # a preempted slot, kept for the urgent task's shard
            if free <= 0:
                ps.room.clear()
                await ps.room.wait()
                continue
            # At most one host's slots: a batch goes to one host, whose agents alone run
            # it, so a bigger one would keep the other hosts idle while it queued for
            # those agents (measured: 48 slots of 6 hosts leased as one batch, 6.75 tasks
            # of 20 ms running at once instead of up to 48; BENCHMARKS.md, issue 17).
            reserved = min(free, max_items, ps.host_slots)
            ps.reserved += reserved  # not in_flight: the autoscaler reads that
            try:
                items, ps.depth[s] = await ps.shards[s].lease_batch.remote(
                    reserved, self.holder
                )
            except ray.exceptions.RayError:
                items = []
                idle = IDLE_POLLS_TO_CAP - 1  # shard restarting: the next wait is the most
            ps.reserved -= reserved
            if reserved > len(items):
                # Slots this loop did not fill go to the other shards' loops, which may
                # be waiting for room this reservation held (an empty shard included).
                ps.room.set()
            if not items:
                idle = min(idle + 1, IDLE_POLLS_TO_CAP)  # at the cap, the wait stays
                await asyncio.sleep(idle_wait(attempt_state(idle)))
                continue
            idle = 0
            if ps.urgent is not None and ps.urgent[0] == s:
                if any(it.priority >= ps.urgent[1] for it in items):
                    ps.urgent = None  # the urgent task has its slot
                    ps.room.set()
            ps.in_flight += len(items)
            ps.sent_batches += 1
            ps.sent_items += len(items)
            held = ps.held[s]
            for it in items:
                held[it.id] = it.deliveries
            asyncio.get_running_loop().create_task(self._send(ps, s, items))

    def _ack(self, ps: _PoolState, s: int, ids: list[str]) -> None:
        """Ack recorded ids still held (from any delivery: their outcome is recorded),
        coalesced per shard: they go out ``ACK_COALESCE_S`` after the first waits."""
        held, buf = ps.held[s], ps.acks[s]
        for i in ids:
            if held.pop(i, _NOT_HELD) != _NOT_HELD:  # None (adopted) is held
                buf.append(i)
        if len(buf) >= ACK_MAX_IDS:
            self._flush_acks(ps, s)
        elif buf and ps.ack_timers[s] is None:
            ps.ack_timers[s] = asyncio.get_running_loop().call_later(
                ACK_COALESCE_S, self._flush_acks, ps, s
            )

    def _flush_acks(self, ps: _PoolState, s: int) -> None:
        t = ps.ack_timers[s]
        if t is not None:
            t.cancel()
            ps.ack_timers[s] = None
        ids, ps.acks[s] = ps.acks[s], []
        if ids:
            asyncio.get_running_loop().create_task(self._send_acks(ps, s, ids))

    @staticmethod
    async def _send_acks(ps: _PoolState, s: int, ids: list[str]) -> None:
        try:
            await ps.shards[s].ack.remote(ids)
        except ray.exceptions.RayError:
            pass  # the shard died: restarted, it acks what the ledger holds (recover)

    def _forget(self, ps: _PoolState, s: int, items: list[Item]) -> list[Item]:
        """Stop holding ``items`` (for the deliveries sent); returns those still held."""
        held = ps.held[s]
        return [it for it in items if _drop_held(held, it.id, it.deliveries)]

    async def _send(self, ps: _PoolState, s: int, items: list[Item]) -> None:
        ids = [it.id for it in items]
        freed = False
        bid = next(self._batch_ids)
        ps.open_batches[bid] = [0, s]
        if ps.preemption is not None:
            sent = time.monotonic()
            for it in items:
                ps.running[it.id] = (
                    RunningTask(it.id, it.priority, sent, it.preemptions),
                    bid,
                )

        def free() -> None:
            # Whatever the host's progress reports have not freed yet.
            nonlocal freed
            if not freed:
                freed = True
                ps.in_flight -= len(items) - ps.open_batches.pop(bid, (0,))[0]
                ps.room.set()

        try:
            # The host records each outcome in the ledger before it replies.
            report = await ps.handle.run_and_record.remote(
                items,
                ps.per_host_agents,
                (self.names.dispatcher, self.spec.namespace, ps.spec.name, bid),
                time.time(),
            )
        except Exception as exc:  # host died or was removed: settle the batch now
            free()
            self._ended(ps, bid, ids)
            await self._failed(ps, s, items, exc)
            return
        # The agents are free as soon as the host replies; the ack need not hold them.
        free()
        _recorded, retry_ids, delays, host = report
        self._host_report(ps, host)
        back = set(retry_ids)
        done = [i for i in ids if i not in back]
        # Runs the host cancelled for a preemption come back with a negative delay:
        # back to the queue now, their deliveries refunded; the rest after their delay.
        cut = {i for i, d in zip(retry_ids, delays) if d < 0}
        self._ended(ps, bid, ids)
        if cut:
            ps.preempted_total += len(cut)
            asyncio.get_running_loop().create_task(
                self._requeue_preempted(ps, s, [it for it in items if it.id in cut])
            )
        if retry := [(d, i) for i, d in zip(retry_ids, delays) if d >= 0]:
            ps.retried_items += len(retry)
            ps.retry_waiting += len(retry)
            dels = {it.id: it.deliveries for it in items}
            asyncio.get_running_loop().create_task(
                self._nack_later(ps, s, sorted((d, i, dels[i]) for d, i in retry))
            )
        self._ack(ps, s, done)

    @staticmethod
    def _host_report(ps: _PoolState, host: dict[str, Any]) -> None:
        """Keep a host's latest report, and add what it finished since its previous one
        to the pool's outcome totals (a degrade rule's error rate): per host, so a host
        that leaves or comes back changes nothing but its own share."""
        prev = ps.hosts_seen.get(host["host"])
        before = prev[1] if prev is not None else {}
        for k, key in enumerate(("completed", "failed")):
            ps.outcomes[k] += max(0, host.get(key, 0) - before.get(key, 0))
        ps.hosts_seen[host["host"]] = (time.monotonic(), host)

    @staticmethod
    def _ended(ps: _PoolState, bid: int, ids: list[str]) -> None:
        """A batch ended: its items no longer run (and the preemption asked of one of
        them, if any, is answered)."""
        if ps.preemption is None:
            return
        if ps.ask is not None and ps.ask[0] == bid:
            ps.ask = None
        for i in ids:
            ps.running.pop(i, None)
            ps.preempting.discard(i)

    async def _requeue_preempted(self, ps: _PoolState, s: int, items: list[Item]) -> None:
        """Give preempted items back to their shard at once, their deliveries refunded
        (fenced by the delivery sent). Their holds go first: once the shard has them
        back, a shard loop may lease them again under the same delivery number."""
        for it in items:
            _drop_held(ps.held[s], it.id, it.deliveries)
        try:
            await ps.shards[s].nack.remote(
                [it.id for it in items],
                "preempted",
                [it.deliveries for it in items],
                False,
                True,
            )
        except ray.exceptions.RayError:
            pass  # the lease expires and the item is redelivered anyway

    async def _preempt_loop(self, ps: _PoolState) -> None:
        """While the pool is full, look for a task that has waited past its pool's
        ``preempt_after_s`` (the shards' ``urgent``) and preempt one running task of a
        lower class for it (``fleet.policy.preemption``), one at a time: the slot it
        frees goes to the urgent task (the priority discipline hands it out first)."""
        rule = ps.preemption
        assert rule is not None
        after_s = ps.spec.preemption.preempt_after_s
        period = check_period_s(after_s)
        while self._running:
            await asyncio.sleep(period)
            now = time.monotonic()
            if ps.ask is not None and now - ps.ask[2] > PREEMPT_ANSWER_S:
                ps.ask = None  # no progress answer carried it to a host
            if ps.urgent is not None and now - ps.urgent[2] > PREEMPT_ANSWER_S:
                ps.urgent = None
                ps.room.set()
            if ps.ask is not None or ps.urgent is not None or ps.in_flight < ps.capacity:
                continue  # one at a time (until its slot is taken), while the pool is full
            cutoff = time.time() - after_s
            answers = await asyncio.gather(
                *(sh.urgent.remote(cutoff) for sh in ps.shards), return_exceptions=True
            )
            found = [(a, s) for s, a in enumerate(answers) if isinstance(a, int)]
            if not found:
                continue
            top, shard = max(found)
            victim = rule.victim(
                top, (t for t, _ in ps.running.values() if t.id not in ps.preempting)
            )
            if victim is None:
                continue
            ps.ask = (ps.running[victim.id][1], victim.id, now)
            ps.urgent = (shard, top, now)

    async def _failed(
        self, ps: _PoolState, s: int, items: list[Item], exc: BaseException
    ) -> None:
        """The batch's call failed: ack what the ledger recorded before, nack the rest.

        When the host's process died (Serve raises ``ActorDiedError`` or, when it cannot
        tell, ``ActorUnavailableError``, possibly wrapped in a ``RayTaskError``), the
        rest is nacked as crashed (poison isolation); after any other failure (the host
        raised, a timeout) it is nacked plainly."""
        crashed = _host_died(exc)
        ps.host_failures += 1
        ps.crashed_batches += crashed
        left = self._forget(ps, s, items)
        if not left:
            return
        try:
            missing = set(
                await asyncio.wait_for(
                    self._ledger.missing_async([it.id for it in left]), CRASH_LEDGER_S
                )
            )
        except Exception:  # the ledger is unreachable: rerun them (it keeps one outcome)
            missing = {it.id for it in left}
        recorded = [it.id for it in left if it.id not in missing]
        rerun = [it for it in left if it.id in missing]
        ps.crash_recorded += len(recorded)
        try:
            if recorded:
                await ps.shards[s].ack.remote(recorded)
            if rerun:
                await ps.shards[s].nack.remote(
                    [it.id for it in rerun],
                    f"host failed: {type(exc).__name__}",
                    [it.deliveries for it in rerun],
                    crashed,
                )
        except ray.exceptions.RayError:
            pass  # shard unreachable: the leases expire and the work is redelivered

    async def _nack_later(
        self, ps: _PoolState, s: int, due: list[tuple[float, str, int]]
    ) -> None:
        """Give retried items back to their shard once each one's backoff has passed.

        ``due``: (delay, id, delivery), sorted. They stay leased (and renewed)
        meanwhile, so a dispatcher crash during the wait still brings them back when
        the lease expires: nothing is lost.
        """
        t0 = time.monotonic()
        held = ps.held[s]
        k = 0
        try:
            while k < len(due):
                wait = t0 + due[k][0] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = time.monotonic() - t0
                group = []
                while k < len(due) and due[k][0] <= now + RETRY_COALESCE_S:
                    group.append(due[k])
                    k += 1
                try:
                    await ps.shards[s].nack.remote(
                        [i for _, i, _ in group], "retry", [d for _, _, d in group]
                    )
                except ray.exceptions.RayError:
                    pass  # the lease expires and the item is redelivered anyway
                finally:
                    ps.retry_waiting -= len(group)
                    for _, i, d in group:
                        _drop_held(held, i, d)
        finally:
            for _, i, d in due[k:]:  # cancelled (stop): the leases expire instead
                _drop_held(held, i, d)
            ps.retry_waiting -= len(due) - k

    async def _renew_leases(self) -> None:
        """Keep leases on in-flight work alive so long tasks are not redelivered."""
        period = self.spec.queues.lease_s * LEASE_RENEW_FRACTION
        while self._running:
            await asyncio.sleep(period)
            for ps in self._pools.values():
                for s, held in enumerate(ps.held):
                    if held:
                        try:
                            await ps.shards[s].extend.remote(
                                list(held), self.holder, list(held.values())
                            )
                        except ray.exceptions.RayError:
                            pass


def _drop_held(held: dict[str, int | None], i: str, delivery: int) -> bool:
    """Forget ``i`` if it is held for ``delivery`` (not for a later one); whether it was."""
    if held.get(i, _NOT_HELD) == delivery:
        del held[i]
        return True
    return False


def _host_died(exc: BaseException) -> bool:
    died = ray.exceptions.RayActorError  # ActorDiedError, ActorUnavailableError
    return isinstance(exc, died) or isinstance(getattr(exc, "cause", None), died)


def _breaker_summary(ps: _PoolState) -> dict[str, Any]:
    """Ejected agents and retries across the pool's hosts, from their latest reports."""
    now = time.monotonic()
    for h in [h for h, (t, _) in ps.hosts_seen.items() if now - t > HOST_REPORT_TTL_S]:
        del ps.hosts_seen[h]
    reports = [r for _, r in ps.hosts_seen.values()]
    return {
        "ejected_agents": sum(r["ejected"] for r in reports),
        "max_ejected_agents": sum(r["max_ejected"] for r in reports),
        "panic_hosts": sum(1 for r in reports if r["panic"]),
        "host_retries": sum(r["retries"] for r in reports),
        "retry_budget_denied": sum(r["retry_budget_denied"] for r in reports),
        "hosts_reporting": len(reports),
        "completed": ps.outcomes[0],  # by every host, since this dispatcher started
        "failed": ps.outcomes[1],
    }
