"""QueueShard: a Ray actor owning one shard of a capability's queue.

It wraps the pure ``LeaseQueue`` and adds what needs a process: clocks, the storage
backend the spec names (memory, or SQLite that survives a crash of this actor), and a
periodic sweep that requeues expired leases and fails items past their deadline
(``deadline_exceeded``) or delivered too often (``max_deliveries``). Such items are
recorded in the ledger first and only then removed from the queue (and its storage),
so an item that cannot be completed is accounted for, never dropped.

Restart (``fleet.runtime.lifecycle``): Ray restarts a dead shard, and calls in flight
(the dispatcher's leases, acks and renewals, clients' puts) are retried on the new
instance. The new instance reloads every accepted item from storage, then, before it
serves any call: acks the items whose outcome the ledger already holds (recorded, but
their ack died with the old instance), and leases back to the dispatcher the items the
dispatcher still holds (running in hosts), so neither is run again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import time
from typing import Any

import ray

from fleet._bounded import BoundedSet
from fleet.observability.metrics import TenantLabels
from fleet.policy.batching import batch_size
from fleet.policy.bulkhead import ShardBulkhead
from fleet.policy.disciplines import overdue_outcome
from fleet.queue.lease_queue import SWEEP_INTERVAL_S, LeaseQueue, QueueFull
from fleet.queue.storage import make_storage
from fleet.runtime.host_metrics import HostMetrics
from fleet.runtime.ledger import LedgerClient
from fleet.runtime.lifecycle import on_start
from fleet.runtime.names import Names
from fleet.spec.queues import QueueSpec
from fleet.task import IdempotencyConflict, Item, Outcome, failed_outcome, tenant_of_id

RECOVER_CHUNK = 20_000  # ids per ledger call when a restarted shard settles its items
RECOVER_TIMEOUT_S = 10.0
NO_POOL = "none"  # the pool label of a shard started without its pool
REASON_HOST_CRASH = "host_crash"  # exhausted by deliveries whose hosts died
REASON_CANCELLED = "cancelled"  # DELETE /tasks/{id} before it started
RECENT_ACKS = 20_000  # acked ids a shard remembers to refuse a racing resubmission
AVG_ITEM_BYTES_PRIOR = 512.0
AVG_ITEM_BYTES_ALPHA = 0.1  # EWMA weight of each put batch's mean item size


class QueueClosed(RuntimeError):
    """The shard's capability is being removed; it accepts nothing more."""


@ray.remote(num_cpus=0)
class QueueShard:
    def __init__(
        self,
        capability: str,
        index: int,
        queue_spec: dict[str, Any],
        max_deliveries: int,
        ledger_name: str,
        namespace: str,
        fleet: str | None = None,
        ledger_shards: int = 1,
        pool: str | None = None,
        metric_tenants: list[str] | None = None,
        bulkhead: dict[str, Any] | None = None,
    ):
        """``pool`` and ``metric_tenants``: the labels of the tasks this shard fails
        itself (counted by a ``fleet.runtime.host_metrics.HostMetrics``). ``bulkhead``:
        this shard's share of the bulkheads (``ShardBulkhead.to_json``)."""
        spec = QueueSpec.model_validate(queue_spec)
        self.capability = capability
        self._closed = False  # set while its pool is being removed
        self.index = index
        self.lease_s = spec.lease_s
        self._fleet = fleet or ledger_name.removesuffix(".ledger")
        self._metrics = HostMetrics(
            pool or NO_POOL, TenantLabels(metric_tenants or ()), fleet=self._fleet
        )
        on_start(namespace, Names(self._fleet).shard(capability, index))
        storage = make_storage(spec.storage, namespace, capability, index, fleet)
        self._q = LeaseQueue.from_spec(
            spec,
            max_deliveries,
            storage=storage,
            bulkhead=None if bulkhead is None else ShardBulkhead.from_json(bulkhead),
        )
        self._bulkhead_refused: dict[str, int] = {}  # by tenant
        self._batch = spec.batch
        self._avg_item_bytes = AVG_ITEM_BYTES_PRIOR
        self._namespace = namespace
        self._ledger = LedgerClient(self._fleet, namespace, ledger_shards)
        self._sweeper: asyncio.Task | None = None
        self._recent_acks = BoundedSet(RECENT_ACKS)
        self.settled_on_start = 0
        self.adopted_on_start = 0
        if len(self._q):  # restarted, or started again on the same storage
            self._recover()

    def _recover(self) -> None:
        """After a restart: settle what the ledger holds, re-lease what the dispatcher
        runs (see the module docstring). Each step is bounded in time: a ledger or
        dispatcher that does not answer only costs a redelivery (absorbed by the
        ledger), never a loss."""
        ids = self._q.pending_ids()
        try:
            missing = set()
            for k in range(0, len(ids), RECOVER_CHUNK):
                missing.update(self._ledger.missing(ids[k : k + RECOVER_CHUNK]))
            done = [i for i in ids if i not in missing]
            if done:
                self.settled_on_start = self._q.ack(done)
        except Exception:  # the ledger is unreachable: items stay ready
            pass
        try:
            dispatcher = ray.get_actor(
                Names(self._fleet).dispatcher, namespace=self._namespace
            )
            held = ray.get(
                dispatcher.held_ids.remote(self.capability, self.index),
                timeout=RECOVER_TIMEOUT_S,
            )
            self.adopted_on_start = self._q.adopt(
                [i for i, _ in held],
                Names(self._fleet).dispatcher,
                self.lease_s,
                time.monotonic(),
                [d for _, d in held],
            )
        except Exception:  # no dispatcher (first start) or it restarts too
            pass

    def _ensure_sweeper(self) -> None:
        # Started lazily: an async actor's event loop exists only once a method runs.
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except Exception:  # the ledger is restarting: the next sweep retries
                pass

    async def sweep(self) -> int:
        """Requeue expired leases; fail overdue and exhausted items; return how many failed."""
        exhausted = self._q.expire(time.monotonic())
        await self._fail_exhausted(exhausted, "lease expired")
        now = time.time()
        overdue = self._q.fail_overdue(now)
        await self._record_then_ack([overdue_outcome(it, now) for it in overdue])
        self._q.flush()
        return len(exhausted) + len(overdue)

    async def _record_then_ack(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        await self._ledger.record_async(outcomes)
        self._metrics.recorded(outcomes, time.time())
        self._metrics.flush()  # rare: sent at once
        self._ack([o.task_id for o in outcomes])  # removes them from durable storage

    def _ack(self, ids: list[str]) -> int:
        n = self._q.ack(ids)
        self._recent_acks.update(ids)
        return n

    async def _fail_exhausted(
        self, items: list[Item], why: str, reason: str = "max_deliveries"
    ) -> None:
        await self._record_then_ack(
            [
                failed_outcome(
                    it, reason, f"delivered {it.deliveries} times without an outcome ({why})"
                )
                for it in items
            ]
        )

    async def put(self, items: list[Item]) -> int:
        """Accept items (all or none). Raises QueueFull when they do not fit (a tenant
        over its bulkhead included), and IdempotencyConflict (accepting none) when a
        pending item has the id of an idempotency key with another payload.

        Ids acked moments ago are ignored like pending ones: a submitter checks the
        ledger before it puts, and this closes the window in which a task's outcome is
        recorded and acked between that check and this put.
        """
        return self._accept(items, refuse=False)[0]

    async def put_within(self, items: list[Item]) -> list[str]:
        """``put``, but the items whose tenant holds its queued share of this shard
        already (``bulkheads``) are refused instead: their ids are returned, and the
        rest is accepted all or none as by ``put``."""
        return self._accept(items, refuse=True)[1]

    def _accept(self, items: list[Item], refuse: bool) -> tuple[int, list[str]]:
        self._ensure_sweeper()
        if self._closed:
            raise QueueClosed(
                f"capability {self.capability!r} is being removed from the fleet "
                "(fleet apply): nothing more is accepted for it"
            )
        if self._recent_acks:
            items = [it for it in items if it.id not in self._recent_acks]
        conflicts = self._q.conflicts(items)
        if conflicts:
            raise IdempotencyConflict(conflicts)
        items, refused = self._q.split_bulkhead(items)
        if refused and not refuse:
            raise QueueFull(len(self._q), self._q.max_depth)
        accepted = self._q.put(items)
        for it in refused:  # counted once the rest is accepted (put did not raise)
            t = tenant_of_id(it.id) or ""
            self._bulkhead_refused[t] = self._bulkhead_refused.get(t, 0) + 1
        if items:
            mean = sum(it.size_bytes for it in items) / len(items)
            self._avg_item_bytes += AVG_ITEM_BYTES_ALPHA * (mean - self._avg_item_bytes)
        return accepted, [it.id for it in refused]

    async def room(self) -> int:
        return self._q.room

    async def close(self, closed: bool = True) -> int:
        """Refuse every later put (``QueueClosed``), or accept them again with
        ``closed=False``; returns the items still pending (queued or running). Before a
        pool is removed: closed, then found empty, its shard can go without stranding a
        task accepted meanwhile."""
        self._closed = closed
        return len(self._q.pending_ids())

    async def lease(self, n: int, holder: str) -> tuple[list[Item], int]:
        """Up to ``n`` items leased to ``holder``, and the depth left behind."""
        self._ensure_sweeper()
        items = self._q.lease(
            n, holder, self.lease_s, time.monotonic(), now_unix_s=time.time()
        )
        return items, self._q.depth

    async def lease_batch(self, free: int, holder: str) -> tuple[list[Item], int]:
        """A batch for a pool with ``free`` slots, sized here, where the depth is known.

        ``fleet.policy.batching.batch_size`` picks the size from this shard's depth now,
        the free slots and the mean item size, so a holder never sizes a batch from a
        depth it saw one call ago. Returns the items and the depth left behind.
        """
        n = batch_size(self._batch, self._q.depth, free, self._avg_item_bytes)
        if n <= 0:
            return [], self._q.depth
        return await self.lease(n, holder)

    async def ack(self, ids: list[str]) -> int:
        return self._ack(ids)

    async def nack(
        self,
        ids: list[str],
        why: str = "holder failed",
        deliveries: list[int] | None = None,
        crashed: bool = False,
        refund: bool = False,
    ) -> int:
        """Requeue leased items (fenced by ``deliveries`` when given). ``crashed``: their
        host died holding them; they are redelivered in smaller batches, and one that
        this exhausts is recorded as ``host_crash`` (see ``LeaseQueue.nack``).
        ``refund``: they were preempted; their deliveries do not count."""
        exhausted = self._q.nack(ids, deliveries, crashed, refund)
        await self._fail_exhausted(
            exhausted, why, REASON_HOST_CRASH if crashed else "max_deliveries"
        )
        return len(ids)

    async def urgent(self, cutoff_unix_s: float) -> int | None:
        """The highest priority of the ready items submitted by ``cutoff_unix_s``."""
        return self._q.urgent(cutoff_unix_s)

    async def extend(
        self, ids: list[str], holder: str, deliveries: list[int] | None = None
    ) -> int:
        return self._q.extend(ids, holder, self.lease_s, time.monotonic(), deliveries)

    async def leased_to(self, holder: str) -> list[str]:
        """Ids leased to ``holder``: a restarted dispatcher adopts its predecessor's."""
        return self._q.leased_to(holder)

    async def release_holder(self, holder: str) -> int:
        items = self._q.release_holder(holder)
        await self._fail_exhausted(items, f"holder {holder} released")
        return len(items)

    async def stats(self) -> dict[str, Any]:
        st = self._q.stats(time.time())
        return {
            "capability": self.capability,
            "shard": self.index,
            "settled_on_start": self.settled_on_start,
            "adopted_on_start": self.adopted_on_start,
            "bulkhead_refused_by_tenant": dict(self._bulkhead_refused),
            **dataclasses.asdict(st),
        }

    async def pending_ids(self) -> list[str]:
        return self._q.pending_ids()

    async def pending_of(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to ``limit`` pending ids that start with ``prefix`` and sort after
        ``after``, in order: one pass over this shard's pending ids (listing is rare; a
        per-tenant index would tax every enqueue instead)."""
        return heapq.nsmallest(
            limit, (i for i in self._q.pending_ids() if i > after and i.startswith(prefix))
        )

    async def known(self, ids: list[str]) -> list[bool]:
        """For each id, whether it is pending in this shard (queued or running)."""
        return self._q.known(ids)

    async def cancel(self, item_id: str) -> str:
        """Cancel a task that has not started: ``cancelled`` once its outcome (reason
        ``cancelled``) is recorded, and only then removed; ``running`` when it is leased
        (it cannot be cancelled any more); ``unknown`` when it is not pending here.

        The item leaves the ready set before the ledger is called, so no lease can take
        it meanwhile; if the record fails it is put back (and the error raised). A
        crash after the record and before the ack is settled by the restarted shard
        (it acks what the ledger holds), so a cancelled task never runs.
        """
        state, item = self._q.cancel(item_id)
        if state == "leased":
            return "running"
        if state != "cancelled" or item is None:
            return state
        outcome = failed_outcome(
            item, REASON_CANCELLED, "cancelled by its submitter before it started"
        )
        try:
            await self._record_then_ack([outcome])
        except BaseException:
            self._q.restore(item)
            raise
        return "cancelled"


__all__ = ["IdempotencyConflict", "QueueFull", "QueueShard"]
