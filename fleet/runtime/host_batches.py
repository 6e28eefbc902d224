"""A host's batches: their bookkeeping, the recording of outcomes, progress reports.

``AgentHost.run_and_record`` takes a batch of items and replies once every item is
settled: recorded in the ledger, or handed back for a retry. The pieces here are the
asyncio side of that; what to decide (retry or not, when a shard's buffer goes out) is
``fleet.policy.host.HostCore``'s.

- ``Batch``: one call's items, counted as they finish and as they are recorded.
- ``Recorder``: final outcomes go to their ledger shard coalesced (``RecordBuffers``
  decides when), each outcome with its delivery number, from which the ledger counts
  duplicate executions; deliveries handed back for a retry are *excused* in the same
  calls (``fleet.runtime.ledger``). A host that dies mid-batch has its finished tasks
  recorded already, so only the unfinished ones run again.
- ``Reporter``: a batch still running after ``PROGRESS_AFTER_S`` tells its dispatcher,
  every ``PROGRESS_INTERVAL_S``, how many items have finished (their slots count as
  free) and which are recorded (acked at once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay

from fleet.observability.tracing import TaskTimes, TaskTracer
from fleet.policy.backoff import backoff_wait
from fleet.policy.host import RecordBuffers
from fleet.runtime.host_metrics import HostMetrics
from fleet.spec.backoff import BackoffSpec
from fleet.task import Item, Outcome, cache_key_of, is_idempotent_id, payload_hash

# A batch still running after PROGRESS_AFTER_S has a straggler: from then on its
# progress goes to the dispatcher every PROGRESS_INTERVAL_S. Batches that finish sooner
# (the usual case) send nothing: freeing their capacity piecemeal would only make the
# dispatcher send more, smaller batches.
PROGRESS_AFTER_S = 0.5
PROGRESS_INTERVAL_S = 0.25
PROGRESS_REPLY_S = 2.0  # a dispatcher restarting answers after this: report again later
RECORD_RETRY_S = 60.0  # a ledger answering with storage errors, before the batch goes back
# Sampled tasks a host keeps between their arrival and their record, at most (their
# entries leave on every path; this bounds a path overlooked).
MAX_TRACED = 100_000
log = logging.getLogger(__name__)
RECORD_BACKOFF = BackoffSpec(initial_backoff_s=0.05, max_backoff_s=2.0, jitter_ratio=0.0)


class BatchReport(NamedTuple):
    """What ``run_and_record`` tells the dispatcher about one batch.

    ``retry_ids`` are the items to give back to the queue, each after its
    ``retry_delays_s`` seconds (their outcome was not recorded); every other item has
    its outcome in the ledger. ``host`` is the host's ``pool_stats()``.
    """

    recorded: int
    retry_ids: list[str]
    retry_delays_s: list[float]
    host: dict[str, Any]


class Batch:
    """A batch in ``run_and_record``: its items are recorded one by one as they finish,
    and the call replies once none is ``left``.

    ``done`` counts the items finished (their slots are free); ``recorded_ids`` the ids
    recorded so far, of which the first ``sent`` went to the dispatcher in progress
    reports (it acks them at once). ``report_from``: when reports start;
    ``unknown``/``ids_sent``: its dispatcher said it does not know the batch, so its
    item ids are sent, once."""

    __slots__ = (
        "delays",
        "done",
        "error",
        "fut",
        "ids_sent",
        "items",
        "left",
        "recorded_ids",
        "report_from",
        "retry_ids",
        "sent",
        "unknown",
    )

    def __init__(self, items: list[Item], fut: asyncio.Future[None], report_from: float):
        self.items = items
        self.left = len(items)
        self.done = 0
        self.recorded_ids: list[str] = []
        self.sent = 0
        self.retry_ids: list[str] = []
        self.delays: list[float] = []
        self.fut = fut
        self.report_from = report_from
        self.unknown = False
        self.ids_sent = False
        self.error: BaseException | None = None
        if not items:
            fut.set_result(None)

    def settled(self) -> None:
        """One more item is settled (recorded, handed back, or failed to record); the
        batch replies once all are: never while one of its tasks still runs, so a
        failure cannot hand back work that is running."""
        self.left -= 1
        if self.left <= 0 and not self.fut.done():
            if self.error is None:
                self.fut.set_result(None)
            else:
                self.fut.set_exception(self.error)

    def failed(self, exc: BaseException) -> None:
        """One item could not be settled (``exc``): the batch fails once all are done."""
        if self.error is None:
            self.error = exc
        self.settled()


def _is_storage_error(exc: BaseException) -> bool:
    from fleet.queue.storage import StorageError

    return isinstance(exc, StorageError) or isinstance(
        getattr(exc, "cause", None), StorageError
    )


class Recorder:
    """Final outcomes (and excusals) to the ledger, coalesced per shard.

    ``ledger`` is (actor name prefix, namespace, shards) for a ``LedgerClient``, made on
    first use; without one, recording raises (the batch fails, it does not hang).
    """

    def __init__(
        self,
        host_id: str,
        ledger: tuple[str, str, int] | None,
        metrics: HostMetrics | None = None,
        tracer: TaskTracer | None = None,
    ):
        self.host_id = host_id
        self.metrics = metrics
        self.tracer = tracer
        # Sampled tasks in flight: id -> (item, sent, received) (``AgentHost._trace``).
        self.traced: dict[str, tuple[Item, float, float]] = {}
        self._ref = ledger
        self.client: Any = None  # a LedgerClient
        self._buffers: RecordBuffers | None = None
        self._timers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle]] = {}

    def settle(
        self, item: Item, o: Outcome, batch: Batch, retry_after_s: float | None
    ) -> None:
        """A task's final word: handed back to the dispatcher for a retry after
        ``retry_after_s`` (its delivery excused in the ledger), or ``o`` recorded (None).
        A negative ``retry_after_s``: it was preempted (``PREEMPTED_DELAY``); its delivery
        is refunded by the queue, so the ledger is told nothing."""
        if retry_after_s is not None:
            batch.retry_ids.append(item.id)
            batch.delays.append(retry_after_s)
            self.dropped([item.id])
            if retry_after_s >= 0:
                if self.metrics is not None:
                    self.metrics.retried(o.reason)
                # This delivery ran no duplicate: tell the ledger with the next records.
                self.add(item.id, None, batch)
            batch.settled()
            return
        if is_idempotent_id(o.task_id):
            # Keyed tasks carry their payload's hash, so a later submission of the key
            # with another payload is refused rather than answered with this outcome.
            o = o._replace(payload_hash=payload_hash(item.payload))
        if item.cache_key is not None and o.ok:  # a recent answer to its key
            o = o._replace(cache_key=cache_key_of(item))
        self.add(o.task_id, o, batch)

    def add(self, task_id: str, o: Outcome | None, batch: Batch) -> None:
        """Queue an outcome (None: an excusal of ``task_id``'s delivery) for its shard."""
        bufs = self._buffers
        if bufs is None:
            if self.client is None:
                if self._ref is None:
                    raise RuntimeError(f"host {self.host_id} has no ledger to record in")
                from fleet.runtime.ledger import LedgerClient

                self.client = LedgerClient(*self._ref)
            bufs = self._buffers = RecordBuffers(self.client.n)
        k = self.client.shard_of(task_id) if self.client.n > 1 else 0
        what = bufs.add(k, (task_id, o, batch), o is not None)
        if what == RecordBuffers.FLUSH:
            self.flush(k)
            return
        loop = asyncio.get_running_loop()
        timer = self._timers.get(k)
        # Armed on another loop (a test ran the host under asyncio.run before): re-arm.
        if what == RecordBuffers.ARM or timer is None or timer[0] is not loop:
            self._timers[k] = (loop, loop.call_later(bufs.coalesce_s, self.flush, k))

    def flush(self, k: int) -> None:
        assert self._buffers is not None
        timer = self._timers.pop(k, None)
        if timer is not None:
            timer[1].cancel()
        entries = self._buffers.take(k)
        if entries:
            asyncio.get_running_loop().create_task(self._record(k, entries))

    async def _record(self, k: int, entries: list[tuple[str, Outcome | None, Batch]]) -> None:
        """Record final outcomes on ledger shard ``k``; each batch hears of its own once
        they are durable.

        A ledger shard that dies is restarted by Ray and the call retried on it (the
        shards are created with ``max_task_retries=-1``), so a restart only delays this.
        A shard that answers with a storage error (a full disk) is asked again with
        backoff for up to ``RECORD_RETRY_S``; the batch's leases are renewed by the
        dispatcher meanwhile, and past that the batch fails and is handed back (its
        unrecorded items only), never dropped.
        """
        outcomes = [o for _, o, _ in entries if o is not None]
        excused = [tid for tid, o, _ in entries if o is None]
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_storage_error),
                wait=backoff_wait(RECORD_BACKOFF, None),
                stop=stop_after_delay(RECORD_RETRY_S),
                reraise=True,
            ):
                with attempt:
                    await self.client.record_shard_async(k, outcomes, excused)
        except Exception as exc:  # the batches fail: AgentHost._batch_done forgets them
            for _, o, b in entries:
                if o is not None:
                    b.failed(exc)  # each batch fails once its other items are settled
            return
        now = time.time()
        try:  # what they record is best effort: it must never hold a batch
            if self.metrics is not None and outcomes:
                self.metrics.recorded(outcomes, now)
            if self.traced and self.tracer is not None:
                self._spans(outcomes, now)
        except Exception:
            log.warning("metrics of %d outcomes not recorded", len(outcomes), exc_info=True)
        for tid, o, b in entries:
            if o is not None:
                b.recorded_ids.append(tid)
                b.settled()

    def dropped(self, task_ids: list[str]) -> None:
        """Tasks that leave this host without an outcome recorded here (handed back, or
        their batch failed): forget their tenants and trace plans."""
        if self.metrics is not None:
            self.metrics.forget(task_ids)
        if self.traced:
            for tid in task_ids:
                self.traced.pop(tid, None)

    def note_traced(self, item: Item, sent: float, received: float) -> None:
        traced = self.traced
        if len(traced) >= MAX_TRACED:  # a backstop: the oldest plans go
            for tid in list(itertools.islice(traced, len(traced) - MAX_TRACED + 1)):
                del traced[tid]
        traced[item.id] = (item, sent, received)

    def _spans(self, outcomes: list[Outcome], recorded: float) -> None:
        assert self.tracer is not None
        for o in outcomes:
            t = self.traced.pop(o.task_id, None)
            if t is not None:
                item, sent, received = t
                self.tracer.emit(
                    item,
                    TaskTimes(
                        item.submitted_unix_s,
                        sent,
                        received,
                        o.started_unix_s,
                        o.finished_unix_s,
                        recorded,
                    ),
                    o.pool,
                    "completed" if o.ok else "failed",
                    o.reason,
                )


class Reporter:
    """Progress of long-running batches to their dispatchers (see ``run_and_record``).

    Every batch older than ``PROGRESS_AFTER_S`` is reported each interval, changed or
    not: the report doubles as the batch's heartbeat. A dispatcher that does not know a
    batch (it was restarted and adopts its predecessor's leases) answers with its id,
    and the batch's item ids follow in the next report, so the new dispatcher keeps them
    leased while they run here. The dispatcher's answer also names the items of these
    batches it preempts (``pools[].preemption``): ``on_preempt(batch, ids)`` cancels
    them.
    """

    def __init__(self, on_preempt: Callable[[Batch, list[str]], Any] | None = None) -> None:
        self._on_preempt = on_preempt
        self.open: dict[tuple[str, str, str, int], Batch] = {}
        self._task: asyncio.Task[None] | None = None
        self._dispatchers: dict[tuple[str, str], Any] = {}

    def add(self, progress: tuple[str, str, str, int], batch: Batch) -> None:
        self.open[progress] = batch
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def remove(self, progress: tuple[str, str, str, int]) -> None:
        self.open.pop(progress, None)

    async def _run(self) -> None:
        import ray

        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            news: dict[tuple[str, str, str], dict[int, int]] = {}
            running: dict[tuple[str, str, str], dict[int, list[str]]] = {}
            recorded: dict[tuple[str, str, str], dict[int, list[str]]] = {}
            marks: dict[tuple[str, str, str], list[tuple[Batch, int]]] = {}
            now = time.monotonic()
            for (name, ns, pool, bid), b in self.open.items():
                if now >= b.report_from:
                    key = (name, ns, pool)
                    news.setdefault(key, {})[bid] = b.done
                    if len(b.recorded_ids) > b.sent:
                        recorded.setdefault(key, {})[bid] = b.recorded_ids[b.sent :]
                        marks.setdefault(key, []).append((b, len(b.recorded_ids)))
                    if b.unknown and not b.ids_sent:  # send the ids once
                        b.ids_sent = True
                        running.setdefault(key, {})[bid] = [it.id for it in b.items]
            for (name, ns, pool), counts in news.items():
                key = (name, ns, pool)
                try:
                    d = self._dispatchers.get((name, ns))
                    if d is None:
                        d = self._dispatchers[(name, ns)] = ray.get_actor(name, namespace=ns)
                    unknown, preempt = await asyncio.wait_for(
                        d.batch_progress.remote(
                            pool, counts, running.get(key), recorded.get(key)
                        ),
                        PROGRESS_REPLY_S,
                    )
                except Exception:
                    self._dispatchers.pop((name, ns), None)  # gone or restarting
                    continue
                for b, upto in marks.get(key, ()):
                    b.sent = upto
                for bid in unknown:
                    b = self.open.get((name, ns, pool, bid))
                    if b is not None:
                        b.unknown = True
                for bid, ids in preempt.items():
                    b = self.open.get((name, ns, pool, bid))
                    if b is not None and self._on_preempt is not None:
                        self._on_preempt(b, ids)


__all__ = ["PROGRESS_AFTER_S", "Batch", "BatchReport", "Recorder", "Reporter"]
