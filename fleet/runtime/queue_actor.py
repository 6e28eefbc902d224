"""QueueShard: a Ray actor owning one shard of a capability's queue.

It wraps the pure ``LeaseQueue`` and adds what needs a process: clocks, the storage
backend the spec names (memory, or SQLite that survives a crash of this actor), and a
periodic sweep that requeues expired leases and fails items past their deadline
(``deadline_exceeded``) or delivered too often (``max_deliveries``). Such items are
recorded in the ledger first and only then removed from the queue (and its storage),
so an item that cannot be completed is accounted for, never dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import ray

from fleet.policy.disciplines import overdue_outcome
from fleet.queue.lease_queue import LeaseQueue, QueueFull
from fleet.queue.storage import make_storage
from fleet.policy.batching import batch_size
from fleet.spec.queues import QueueSpec
from fleet.task import Item, Outcome, failed_outcome

SWEEP_INTERVAL_S = 0.5
AVG_ITEM_BYTES_PRIOR = 512.0
AVG_ITEM_BYTES_ALPHA = 0.1  # EWMA weight of each put batch's mean item size


@ray.remote(num_cpus=0)
class QueueShard:
    def __init__(self, capability: str, index: int, queue_spec: dict[str, Any],
                 max_deliveries: int, ledger_name: str, namespace: str,
                 fleet: str | None = None):
        spec = QueueSpec.model_validate(queue_spec)
        self.capability = capability
        self.index = index
        self.lease_s = spec.lease_s
        storage = make_storage(spec.storage, namespace, capability, index, fleet)
        self._q = LeaseQueue.from_spec(spec, max_deliveries, storage=storage)
        self._batch = spec.batch
        self._avg_item_bytes = AVG_ITEM_BYTES_PRIOR
        self._ledger_name = ledger_name
        self._namespace = namespace
        self._ledger = None
        self._sweeper: asyncio.Task | None = None

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
        """Requeue expired leases; fail overdue and exhausted items. Returns how many failed."""
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
        if self._ledger is None:
            self._ledger = ray.get_actor(self._ledger_name, namespace=self._namespace)
        await self._ledger.record.remote(outcomes)
        self._q.ack([o.task_id for o in outcomes])  # removes them from durable storage

    async def _fail_exhausted(self, items: list[Item], why: str) -> None:
        await self._record_then_ack([
            failed_outcome(it, "max_deliveries",
                           f"delivered {it.deliveries} times without an outcome ({why})")
            for it in items
        ])

    async def put(self, items: list[Item]) -> int:
        """Accept items (all or none). Raises QueueFull when they do not fit."""
        self._ensure_sweeper()
        accepted = self._q.put(items)
        if items:
            mean = sum(it.size_bytes for it in items) / len(items)
            self._avg_item_bytes += AVG_ITEM_BYTES_ALPHA * (mean - self._avg_item_bytes)
        return accepted

    async def room(self) -> int:
        return self._q.room

    async def lease(self, n: int, holder: str) -> tuple[list[Item], int]:
        """Up to ``n`` items leased to ``holder``, and the depth left behind."""
        self._ensure_sweeper()
        items = self._q.lease(n, holder, self.lease_s, time.monotonic(),
                              now_unix_s=time.time())
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
        return self._q.ack(ids)

    async def nack(self, ids: list[str], why: str = "holder failed") -> int:
        exhausted = self._q.nack(ids)
        await self._fail_exhausted(exhausted, why)
        return len(ids)

    async def extend(self, ids: list[str], holder: str) -> int:
        return self._q.extend(ids, holder, self.lease_s, time.monotonic())

    async def release_holder(self, holder: str) -> int:
        items = self._q.release_holder(holder)
        await self._fail_exhausted(items, f"holder {holder} released")
        return len(items)

    async def stats(self) -> dict[str, Any]:
        st = self._q.stats(time.time())
        return {"capability": self.capability, "shard": self.index, **dataclasses.asdict(st)}

    async def pending_ids(self) -> list[str]:
        return self._q.pending_ids()


__all__ = ["QueueFull", "QueueShard"]
