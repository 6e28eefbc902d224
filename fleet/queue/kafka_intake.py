"""Kafka intake: tasks consumed from a topic by a consumer group, offsets committed only
behind finished work, malformed messages dead-lettered, results optionally published.

Use it for multi-machine deployments where producers write tasks to Kafka: one
``KafkaIntake`` per consumer process (any number, one group), each handing valid tasks
to ``accept`` (the fleet's submit) and told by the runtime, through ``complete``, when a
task's outcome is recorded.

Offset commits (the correctness argument). Within a partition, Kafka delivers offsets in
increasing order, so the offsets a consumer has taken but not finished form a sorted
sequence (a deque, appended on the right). ``OffsetTracker`` commits the lowest offset
still unfinished (or one past the last taken when none is). Every offset below a
committed value is therefore finished, i.e. its outcome is in the ledger (or its dead
letter is written). After a crash or rebalance the group resumes at the committed
offset: nothing unfinished is skipped (at-least-once); what was finished above it is
delivered again and absorbed by the ledger's exactly-once recording by task id.

Rebalances: a revoked partition is committed as far as it is finished; its bookkeeping
is dropped only if the new assignment does not give it back (kafka-python keeps the
fetch position of a partition that stays, so what was taken is not delivered again), and
at once when the consumer is evicted (its positions are dropped, it resumes at the
committed offset). Only partitions currently owned are committed.

Security: every client is built with ``kafka_security_kwargs(spec.security)`` (TLS,
SASL; ``fleet.queue.kafka_security``), so they all connect the same way.

A malformed message (not JSON, not a task, unknown capability, payload over the limit,
deadline already past) is written to the dead-letter topic with the reason and then
counts as finished: it never blocks its partition.

Threading: the consumer is driven by one thread (``run_once`` / ``run``); ``complete``
may be called from any thread.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import queue as _queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleet.queue.kafka_security import kafka_security_kwargs
from fleet.spec.queues import KafkaIntakeSpec
from fleet.task import Item, Outcome, TaskRejected, parse_task_json, to_item

Accept = Callable[[list[Item]], Iterable[str] | None]


class NotAdmitted(Exception):
    """``accept`` took only part of a batch: admission control refused ``rest`` (the
    pool would make them wait too long). They stay in the backlog, and the partitions
    stay paused, until ``retry_after_s`` has passed; ``known``: ids of the batch already
    finished, as ``accept`` returns them."""

    def __init__(self, rest: list[Item], known: list[str], retry_after_s: float):
        super().__init__(f"{len(rest)} task(s) not admitted; retry after {retry_after_s:g}s")
        self.rest = rest
        self.known = known
        self.retry_after_s = retry_after_s


Parse = Callable[[bytes | None, str], Item]  # (message value, id if it names none)

DLQ_REASON_HEADER = "fleet-dlq-reason"
_POLL_TIMEOUT_S = 0.2
_PRODUCER_FLUSH_TIMEOUT_S = 30.0
_MAX_TOPIC_IN_ID = 96  # keeps record ids within Task.id's 128 characters


class _Partition:
    __slots__ = ("committed", "done", "generation", "next", "offsets")

    def __init__(self, generation: int) -> None:
        self.offsets: deque[int] = deque()  # taken, not yet committable; ascending
        self.done: set[int] = set()  # finished members of ``offsets``
        self.next: int | None = None  # one past the last offset taken
        self.committed: int | None = None
        self.generation = generation


class OffsetTracker:
    """Per-partition in-flight offsets and the offset it is safe to commit.

    Pure bookkeeping (no Kafka objects needed: a partition is any hashable key).
    """

    def __init__(self) -> None:
        self._parts: dict[Any, _Partition] = {}
        self._generation = 0

    def _part(self, tp: Any) -> _Partition:
        p = self._parts.get(tp)
        if p is None:
            self._generation += 1
            p = self._parts[tp] = _Partition(self._generation)
        return p

    def generation(self, tp: Any) -> int:
        """Changes each time the partition is (re)acquired, so stale completions from
        before a revocation can be told apart."""
        return self._part(tp).generation

    def start(self, tp: Any, offset: int) -> bool:
        """Record an offset taken for processing. False if it is not beyond the last
        one taken (a redelivery within this assignment): the caller skips it."""
        p = self._part(tp)
        if p.next is not None and offset < p.next:
            return False
        if p.committed is None:
            p.committed = offset  # where this assignment resumed: nothing new to commit
        p.offsets.append(offset)
        p.next = offset + 1
        return True

    def finish(self, tp: Any, offset: int, generation: int | None = None) -> None:
        """Record an offset as finished (outcome recorded or dead-lettered)."""
        p = self._parts.get(tp)
        if p is None or (generation is not None and generation != p.generation):
            return  # revoked since: the new owner redelivers it
        if offset < (p.offsets[0] if p.offsets else (p.next or 0)):
            return  # already committable
        p.done.add(offset)
        while p.offsets and p.offsets[0] in p.done:
            p.done.discard(p.offsets.popleft())

    def commit_point(self, tp: Any) -> int | None:
        """The offset to commit: the lowest unfinished one, else one past the last taken."""
        p = self._parts.get(tp)
        if p is None or p.next is None:
            return None
        return p.offsets[0] if p.offsets else p.next

    def to_commit(self) -> dict[Any, int]:
        """Partitions whose commit point moved past what was last committed."""
        out = {}
        for tp, p in self._parts.items():
            c = self.commit_point(tp)
            if c is not None and (p.committed is None or c > p.committed):
                out[tp] = c
        return out

    def committed(self, offsets: dict[Any, int]) -> None:
        for tp, c in offsets.items():
            p = self._parts.get(tp)
            if p is not None:
                p.committed = c

    def in_flight(self, tp: Any | None = None) -> int:
        """Offsets taken and not committable yet (for one partition, or all)."""
        parts = self._parts.values() if tp is None else [self._parts.get(tp)]
        return sum(len(p.offsets) - len(p.done) for p in parts if p is not None)

    def revoke(self, tp: Any) -> None:
        """Forget a partition this consumer no longer owns."""
        self._parts.pop(tp, None)

    def partitions(self) -> list[Any]:
        return list(self._parts)


def record_task_id(topic: str, partition: int, offset: int) -> str:
    """The task id of a message that names none: stable across redeliveries.

    A redelivered message (after a consumer died before committing) gets the same id, so
    the ledger records it once. Topics too long for a task id are hashed.
    """
    if len(topic) > _MAX_TOPIC_IN_ID:
        topic = hashlib.sha1(topic.encode()).hexdigest()
    return f"kafka:{topic}:{partition}:{offset}"


def task_parser(
    capabilities: Iterable[str],
    max_payload_bytes: int,
    clock_unix: Callable[[], float] = time.time,
) -> Parse:
    """The default ``parse``: JSON task -> validated Item, TaskRejected when malformed.

    The task's id is, in order: ``idem-<idempotency_key>`` if the message has one, its
    ``id`` if it has one, else ``default_id`` (from the record's topic, partition and
    offset). Never a random id: a redelivered message must map to the same ledger entry.
    """
    caps = frozenset(capabilities)

    def parse(value: bytes | None, default_id: str) -> Item:
        if value is None:
            raise TaskRejected("<message>", "empty message value (a tombstone), not a task")
        data = parse_task_json(value, "<message>")
        data.setdefault("id", default_id)
        return to_item(data, caps, max_payload_bytes, now_unix_s=clock_unix())

    return parse


@dataclass
class IntakeStats:
    consumed: int = 0
    accepted: int = 0
    dead_lettered: int = 0
    completed: int = 0
    commits: int = 0
    commits_failed: int = 0
    results_published: int = 0
    redelivered_skipped: int = 0
    admission_pauses: int = 0  # rounds admission control refused part of the backlog
    rebalances: int = 0
    last_commit: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Where:
    tp: Any
    offset: int
    generation: int


class KafkaIntake:
    """One consumer of the intake topic (see the module docstring).

    ``accept(items)`` hands valid tasks to the fleet and may return ids it already knows
    as finished (duplicates of recorded tasks), which complete at once. If it raises
    (e.g. the queue is full) the batch is retried on the next round and consumption
    pauses meanwhile. ``consumer``/``producer`` may be injected (tests); by default they
    are kafka-python clients built from ``spec``, including its ``security`` settings,
    whose password variables are read from ``environ`` (KafkaSecurityError, naming the
    variable, if one is unset).
    """

    def __init__(
        self,
        spec: KafkaIntakeSpec,
        accept: Accept,
        parse: Parse,
        *,
        client_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        consumer: Any = None,
        producer: Any = None,
        environ: Mapping[str, str] = os.environ,
        redact: Callable[[str], str] = lambda s: s,
    ):
        """``redact``: applied to a failed result's error before it is published (the
        fleet's secrets out of tracebacks, as the ingress does)."""
        self.spec = spec
        self._redact = redact
        self._accept = accept
        self._parse = parse
        self._clock = clock
        self.tracker = OffsetTracker()
        self.stats = IntakeStats()
        self._where: dict[str, list[_Where]] = {}
        self._done: _queue.SimpleQueue[tuple[str, Outcome | None]] = _queue.SimpleQueue()
        self._backlog: list[Item] = []  # parsed, not yet accepted by the fleet
        self._hold_until = -math.inf  # admission control: no retry before (clock)
        self._last_commit_s = clock()
        self._paused = False
        self._closed = False
        # Read once, before any client exists, so a missing secret fails here; passed on,
        # not kept: the secrets stay only in the clients' own configuration.
        security = (
            kafka_security_kwargs(spec.security, environ)
            if consumer is None or producer is None
            else {}
        )
        self._producer = (
            producer if producer is not None else self._make_producer(client_id, security)
        )
        self._consumer = (
            consumer if consumer is not None else self._make_consumer(client_id, security)
        )

    # --- clients -------------------------------------------------------------------

    def _make_consumer(self, client_id: str | None, security: dict[str, Any]) -> Any:
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        intake = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                intake._on_revoked(list(revoked))

            def on_partitions_assigned(self, assigned: Any) -> None:
                intake.stats.rebalances += 1

            def on_partitions_lost(self, lost: Any) -> None:
                intake._on_lost(list(lost))

        s = self.spec
        c = KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            client_id=client_id or "fleet-intake",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.max_poll_records,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            # Measured against Tansu: the defaults (1 MiB per partition) fetch in small
            # slices and consume at ~2k msg/s; 4 MiB slices reach ~40k msg/s.
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=100,
            **security,
        )
        c.subscribe([s.topic], listener=_Listener())
        return c

    def _make_producer(self, client_id: str | None, security: dict[str, Any]) -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=self.spec.bootstrap_servers,
            client_id=(client_id or "fleet-intake") + "-producer",
            acks="all",
            linger_ms=5,
            retries=5,
            **security,
        )

    # --- the loop --------------------------------------------------------------------

    def complete(self, task_id: str, outcome: Outcome | None = None) -> None:
        """The task's outcome is recorded (thread-safe). With a results topic and an
        ``outcome``, the result is published before the offset may be committed."""
        self._done.put((task_id, outcome))

    def in_flight_ids(self) -> list[str]:
        """Ids of tasks taken from the topic whose outcome is not yet known here (call
        from the consuming thread), e.g. to ask the ledger which are recorded."""
        return list(self._where)

    def run(self, stop: threading.Event, poll_timeout_s: float = _POLL_TIMEOUT_S) -> None:
        """Consume until ``stop`` is set, then commit what is finished and close."""
        try:
            while not stop.is_set():
                self.run_once(poll_timeout_s)
        finally:
            self.close()

    def run_once(self, poll_timeout_s: float = _POLL_TIMEOUT_S) -> int:
        """One round: finish completed tasks, poll, dead-letter, accept, maybe commit.
        Returns how many records were consumed."""
        self._drain_completions()
        self._retry_backlog()
        self._set_paused(
            bool(self._backlog) or self.tracker.in_flight() >= self.spec.max_in_flight
        )
        records = self._consumer.poll(
            timeout_ms=int(poll_timeout_s * 1000), max_records=self.spec.max_poll_records
        )
        self._forget_unassigned()
        n = 0
        dead: list[tuple[Any, int, Any, str]] = []
        fresh: list[Item] = []
        for tp, recs in records.items():
            gen = self.tracker.generation(tp)
            for rec in recs:
                if not self.tracker.start(tp, rec.offset):
                    self.stats.redelivered_skipped += 1
                    continue
                n += 1
                try:
                    item = self._parse(
                        rec.value, record_task_id(tp.topic, tp.partition, rec.offset)
                    )
                except TaskRejected as exc:
                    dead.append((tp, rec.offset, rec, str(exc)))
                    continue
                self._where.setdefault(item.id, []).append(_Where(tp, rec.offset, gen))
                fresh.append(item)
        self.stats.consumed += n
        if dead:
            self._dead_letter(dead)
        if fresh:
            self._backlog.extend(fresh)
            self._retry_backlog()
        self._drain_completions()
        if self._clock() - self._last_commit_s >= self.spec.commit_interval_s or not n:
            from kafka.errors import CommitFailedError, RebalanceInProgressError

            try:
                self.commit()
            except (CommitFailedError, RebalanceInProgressError):
                self.stats.commits_failed += 1  # rebalancing: the next round commits
        return n

    def _retry_backlog(self) -> None:
        if not self._backlog or self._clock() < self._hold_until:
            return
        try:
            known = self._accept(self._backlog)
        except NotAdmitted as exc:  # admission control: pause instead of refusing
            self.stats.accepted += len(self._backlog) - len(exc.rest)
            self.stats.admission_pauses += 1
            self._backlog = exc.rest
            self._hold_until = self._clock() + exc.retry_after_s
            known = exc.known
        except Exception:  # full/unavailable: keep it, try next round
            return
        else:
            self.stats.accepted += len(self._backlog)
            self._backlog = []
        for task_id in known or ():
            self._done.put((task_id, None))

    def _set_paused(self, pause: bool) -> None:
        # Paused partitions still let poll() run the group protocol (heartbeats,
        # rebalances), so a full fleet slows intake down without losing membership.
        # Pausing every round also covers partitions assigned since the last one.
        if pause:
            self._consumer.pause(*self._consumer.assignment())
        elif self._paused:
            self._consumer.resume(*self._consumer.paused())
        self._paused = pause

    def _drain_completions(self) -> None:
        publish: list[tuple[str, Outcome]] = []
        while True:
            try:
                task_id, outcome = self._done.get_nowait()
            except _queue.Empty:
                break
            if outcome is not None and self.spec.results_topic:
                publish.append((task_id, outcome))
            else:
                self._finish(task_id)
        if publish:
            futures = [
                (
                    task_id,
                    self._producer.send(
                        self.spec.results_topic,
                        key=task_id.encode(),
                        value=_outcome_json(o, self._redact),
                    ),
                )
                for task_id, o in publish
            ]
            self._producer.flush(timeout=_PRODUCER_FLUSH_TIMEOUT_S)
            for task_id, fut in futures:
                if fut.succeeded():
                    self.stats.results_published += 1
                    self._finish(task_id)
                else:  # not published: not finished; try again next round
                    self._done.put((task_id, next(o for t, o in publish if t == task_id)))

    def _finish(self, task_id: str) -> None:
        for w in self._where.pop(task_id, ()):
            self.tracker.finish(w.tp, w.offset, w.generation)
            self.stats.completed += 1

    def _dead_letter(self, dead: Sequence[tuple[Any, int, Any, str]]) -> None:
        futures = []
        for tp, offset, rec, reason in dead:
            body = {
                "reason": reason,
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": offset,
                "timestamp_ms": rec.timestamp,
                **_raw_value(rec.value),
            }
            futures.append(
                (
                    tp,
                    offset,
                    self._producer.send(
                        self.spec.dlq_topic,
                        key=rec.key,
                        value=orjson.dumps(body),
                        headers=[(DLQ_REASON_HEADER, reason.encode()[:1024])],
                    ),
                )
            )
        self._producer.flush(timeout=_PRODUCER_FLUSH_TIMEOUT_S)
        failed = [f for *_, f in futures if not f.succeeded()]
        if failed:
            # Not written: the offsets must not pass these messages. Raising stops this
            # consumer without committing; the group redelivers from the last commit.
            raise RuntimeError(
                f"could not write {len(failed)} dead letters to "
                f"{self.spec.dlq_topic!r}: {failed[0].exception!r}"
            )
        gen = {tp: self.tracker.generation(tp) for tp, *_ in dead}
        for tp, offset, _ in futures:
            self.tracker.finish(tp, offset, gen[tp])
        self.stats.dead_lettered += len(dead)

    def commit(self) -> dict[Any, int]:
        """Commit every partition whose lowest unfinished offset moved; returns them."""
        from kafka.structs import OffsetAndMetadata

        self._last_commit_s = self._clock()
        owned = self._consumer.assignment()
        offsets = {tp: o for tp, o in self.tracker.to_commit().items() if tp in owned}
        if not offsets:
            return {}
        self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        self.tracker.committed(offsets)
        self.stats.commits += 1
        self.stats.last_commit.update(
            {f"{tp.topic}/{tp.partition}": o for tp, o in offsets.items()}
        )
        return offsets

    def _on_revoked(self, revoked: list[Any]) -> None:
        # Last chance to commit what this consumer finished on these partitions; their
        # unfinished tasks stay in the fleet and are redelivered to the new owner. The
        # bookkeeping is kept until the new assignment is known (``_forget_unassigned``):
        # kafka-python keeps the fetch position of a partition assigned again to the same
        # consumer, so the offsets it already took are not delivered again and must stay
        # tracked, or the partition's commit point would wait for them forever.
        self._drain_completions()
        try:
            self.commit()
        except Exception:  # the group moved on; the new owner redelivers
            pass

    def _on_lost(self, lost: list[Any]) -> None:
        # Evicted from the group: kafka-python drops these partitions' positions, so if
        # they come back they resume at the committed offset. Nothing may be committed.
        for tp in lost:
            self.tracker.revoke(tp)

    def _forget_unassigned(self) -> None:
        """Drop the bookkeeping of partitions this consumer no longer owns."""
        owned = self._consumer.assignment()
        for tp in self.tracker.partitions():
            if tp not in owned:
                self.tracker.revoke(tp)

    def close(self, commit: bool = True) -> None:
        """Commit what is finished (unless ``commit`` is False) and close the clients."""
        if self._closed:
            return
        self._closed = True
        try:
            if commit:
                self._drain_completions()
                self.commit()
        finally:
            self._consumer.close(autocommit=False)
            self._producer.close()


def _raw_value(value: bytes | None) -> dict[str, str | None]:
    if value is None:
        return {"value": None}
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode()}


def _outcome_json(o: Outcome, redact: Callable[[str], str] = lambda s: s) -> bytes:
    if o.error is not None:
        o = o._replace(error=redact(o.error))
    return o.to_result().model_dump_json().encode()


__all__ = [
    "DLQ_REASON_HEADER",
    "IntakeStats",
    "KafkaIntake",
    "OffsetTracker",
    "record_task_id",
    "task_parser",
]
