"""Kafka intake wired into a running fleet, against a real broker (Tansu, see conftest).

The fleet's own intake actors consume the topic in one group, put tasks in the queue
shards, learn from the ledger which are recorded and commit behind them. One consumer
is killed mid-run (no close, no commit); the other takes over its partitions after the
session timeout and the redelivered messages are absorbed by their stable ids.
"""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
import ray
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from fleet.queue.kafka_intake import record_task_id
from fleet.runtime.names import Names
from tests.queue.test_kafka_intake import _committed, _topic
from tests.utils import eventually, make_spec, pool

pytestmark = pytest.mark.ray

TASKS = 50_000
PARTITIONS = 4
MALFORMED = 20


def _produce(bootstrap: str, topic: str) -> tuple[list[str], dict[int, int]]:
    """50,000 tasks (no ids: the fleet derives them from the record) and a few
    malformed messages, spread over the partitions. Returns the task ids the fleet must
    record and the end offset of each partition."""
    p = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024
    )
    bad_every = TASKS // MALFORMED
    futures = []
    for i in range(TASKS + MALFORMED):
        if i % (bad_every + 1) == bad_every:
            value = b'{"capability": "work", "priority": "high"'  # not JSON
            futures.append((False, p.send(topic, key=str(i).encode(), value=value)))
        else:
            value = orjson.dumps({"capability": "work", "payload": i})
            futures.append((True, p.send(topic, key=str(i).encode(), value=value)))
    p.flush(timeout=60)
    ids, ends = [], {}
    for is_task, f in futures:
        md = f.get(timeout=10)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
        if is_task:
            ids.append(record_task_id(topic, md.partition, md.offset))
    p.close()
    return ids, ends


def _dead_letters(bootstrap: str, topic: str, distinct: int, timeout_s: float = 20.0) -> list:
    """Dead letters read until ``distinct`` different source offsets are seen."""
    c = KafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    c.assign([TopicPartition(topic, 0)])
    out: list = []

    def all_seen() -> bool:  # the poll itself waits up to 500 ms for records
        for recs in c.poll(timeout_ms=500).values():
            out.extend(orjson.loads(r.value) for r in recs)
        return len({(d["partition"], d["offset"]) for d in out}) >= distinct

    try:
        eventually(all_seen, timeout_s, 0, what=f"{distinct} distinct dead letters")
    finally:
        c.close(autocommit=False)
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fleet_consumes_topic_with_two_consumers_one_killed(kafka_broker, start_fleet):
    t0 = time.monotonic()
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    topic = _topic(admin, PARTITIONS)
    admin.close()
    ids, ends = _produce(kafka_broker.bootstrap, topic)
    assert len(ids) == TASKS and sum(ends.values()) == TASKS + MALFORMED
    assert len(ends) == PARTITIONS

    group = f"fleet-{uuid.uuid4().hex[:6]}"
    # No-op agents and big batches; the kill comes after a few thousand of 50,000 are
    # recorded. In-flight work per consumer is bounded, so the killed one leaves
    # uncommitted messages behind.
    spec = make_spec(
        pool(
            "work",
            cpus_per_host=0,
            agents_per_host=100,
            autoscaling={"min_agents": 200, "max_agents": 200},
        ),
        name="kf",
        namespace=f"fleet-kafka-{group}",
        queues={
            "shards": 2,
            "lease_s": 30,
            "batch": {"max_items": 512},
            "kafka": {
                "bootstrap_servers": kafka_broker.bootstrap,
                "topic": topic,
                "group_id": group,
                "consumers": 2,
                "max_in_flight": 10_000,
                "max_poll_records": 2_000,
                "commit_interval_s": 0.2,
                "session_timeout_s": 4.0,
                "heartbeat_interval_s": 0.5,
            },
        },
    )
    t1 = time.monotonic()
    fc = start_fleet(spec)
    t2 = time.monotonic()
    names = Names(spec.name)
    a, b = (ray.get_actor(names.kafka_intake(i), namespace=spec.namespace) for i in (0, 1))

    def both_consuming() -> bool:
        return all(
            s["completed"] >= 2_000 for s in ray.get([a.stats.remote(), b.stats.remote()])
        )

    eventually(
        both_consuming, 60, 0.2, what="both consumers to commit work from their partitions"
    )
    before = ray.get(a.stats.remote())
    ray.kill(a)  # no close, no commit, no LeaveGroup: the group notices by timeout
    killed_at = fc.summary(ids)["recorded"]
    committed_at_kill = _committed(kafka_broker.bootstrap, group, topic, PARTITIONS)
    assert killed_at < TASKS, "the run finished before the kill: slow the agents down"

    t3 = time.monotonic()
    missing = fc.wait(ids, timeout_s=150)
    t4 = time.monotonic()
    assert missing == [], f"{len(missing)} tasks never recorded, e.g. {missing[:3]}"
    eventually(
        lambda: _committed(kafka_broker.bootstrap, group, topic, PARTITIONS) == ends,
        30,
        0.5,
        what=f"committed offsets to reach the partition ends {ends}",
    )

    t5 = time.monotonic()
    s = fc.summary(ids)
    assert (s["recorded"], s["completed"], s["lost"]) == (TASKS, TASKS, 0)
    # Each task recorded exactly once: the ledger holds one entry per id and nothing
    # else (a redelivery under a fresh id would show up here as an extra entry).
    assert fc.status()["ledger"]["recorded"] == TASKS
    survivor = fc.status()["kafka"][1]
    assert survivor["error"] is None and survivor["rebalances"] >= 2, survivor
    # Each malformed message is dead-lettered with its reason (twice if redelivered).
    dead = _dead_letters(kafka_broker.bootstrap, f"{topic}.dlq", MALFORMED)
    assert len({(d["partition"], d["offset"]) for d in dead}) == MALFORMED
    assert all("malformed JSON" in d["reason"] for d in dead)
    print(
        f"\nkafka fleet: {TASKS} tasks recorded once; killed consumer 0 at {killed_at} "
        f"recorded (stats {before}, committed then {committed_at_kill}); "
        f"{s['duplicate_executions']} duplicate executions "
        f"absorbed; survivor {survivor}; produce {t1 - t0:.1f} s, start {t2 - t1:.1f} s, "
        f"to kill {t3 - t2:.1f} s, to all recorded {t4 - t3:.1f} s, to committed "
        f"{t5 - t4:.1f} s"
    )
