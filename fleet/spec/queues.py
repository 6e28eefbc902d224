"""Queue section: bounds, leases, disciplines, sharding, storage, alerts, payload limits
and dispatcher batching."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Literal

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_LEASE_S = 60.0
DEFAULT_PRIORITY_AGING_LIMIT_S = 300.0
DEFAULT_UTILITY = 0.0
DEFAULT_QUEUE_DIRECTORY = "~/.fleet/queues"
DEFAULT_KAFKA_CONSUMERS = 1
DEFAULT_LEDGER_POLL_S = 0.25


class Discipline(str, Enum):
    """The order in which a queue hands out ready items (``fleet.policy.disciplines``)."""

    FIFO = "fifo"
    PRIORITY = "priority"  # highest priority first, with aging (priority_aging_limit_s)
    DEADLINE = "deadline"  # earliest deadline first; items past it fail deadline_exceeded
    UTILITY = "utility"  # highest (possibly decaying) value first


class StorageBackend(str, Enum):
    MEMORY = "memory"  # fastest; lost with the process holding the queue
    SQLITE = "sqlite"  # embedded, durable across kill -9; no server


DEFAULT_STORAGE_BACKEND = StorageBackend.SQLITE


class ShardBy(str, Enum):
    """How a submitted task picks its shard within its capability's queue."""

    SPREAD = "spread"  # the shallower of two random shards (power of two choices)
    AFFINITY_KEY = "affinity_key"  # stable hash of the task's affinity key (spread if none)


class AlertMetric(str, Enum):
    """What an alert rule watches; the values ``fleet.queue.monitor`` reports."""

    DEPTH = "depth"  # ready items
    LEASED = "leased"
    PENDING = "pending"  # ready + leased
    OLDEST_AGE_S = "oldest_age_s"
    AGE_P50_S = "age_p50_s"
    AGE_P90_S = "age_p90_s"
    AGE_P99_S = "age_p99_s"
    ENQUEUE_PER_S = "enqueue_per_s"
    DEQUEUE_PER_S = "dequeue_per_s"
    LEASE_EXPIRIES_PER_S = "lease_expiries_per_s"
    REDELIVERIES_PER_S = "redeliveries_per_s"
    DEADLINE_EXCEEDED_PER_S = "deadline_exceeded_per_s"
    SHARD_MAX_OVER_MEAN = "shard_max_over_mean"  # queue scope only
    SHARD_CV = "shard_cv"  # queue scope only


class AlertScope(str, Enum):
    QUEUE = "queue"  # one subject per capability queue (shards aggregated)
    SHARD = "shard"  # one subject per shard


_COMPARATORS = (">=", "<=", ">", "<")
_RULE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE_,]+)\s*$")
_QUEUE_ONLY_METRICS = (AlertMetric.SHARD_MAX_OVER_MEAN, AlertMetric.SHARD_CV)


class QueueAlertRule(SpecModel):
    """One alert: fires when ``metric op threshold`` has held for ``for_s`` seconds on any
    subject (queue or shard), clears when the value no longer passes ``clear_threshold``.

    ``clear_threshold`` gives hysteresis (default: the threshold itself), e.g. fire at
    depth > 10,000 and clear only once depth <= 8,000. In YAML a rule may be written as a
    string: ``"depth > 10000"``.
    """

    metric: AlertMetric
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float
    clear_threshold: float | None = None
    for_s: float = Field(default=0.0, ge=0)
    scope: AlertScope = AlertScope.QUEUE
    severity: Literal["info", "warning", "critical"] = "warning"
    name: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="before")
    @classmethod
    def _parse_string(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        m = _RULE_RE.match(data)
        if m is None:
            raise ValueError(
                f"alert rule {data!r} is not of the form '<metric> <op> <number>' "
                f"with op one of {', '.join(_COMPARATORS)}"
            )
        metric, op, number = m.groups()
        try:
            threshold = float(number.replace(",", ""))
        except ValueError:
            raise ValueError(f"alert rule {data!r}: {number!r} is not a number") from None
        return {"metric": metric, "op": op, "threshold": threshold}

    @model_validator(mode="after")
    def _check(self) -> QueueAlertRule:
        clear = self.clear_threshold
        if clear is not None:
            if self.op in (">", ">=") and clear > self.threshold:
                raise ValueError(
                    f"clear_threshold ({clear}) must be <= threshold ({self.threshold}) "
                    f"for a '{self.op}' rule, or the alert could never clear"
                )
            if self.op in ("<", "<=") and clear < self.threshold:
                raise ValueError(
                    f"clear_threshold ({clear}) must be >= threshold ({self.threshold}) "
                    f"for a '{self.op}' rule, or the alert could never clear"
                )
        if self.scope is AlertScope.SHARD and self.metric in _QUEUE_ONLY_METRICS:
            raise ValueError(
                f"metric {self.metric.value} is a queue-wide measure; use scope: queue"
            )
        return self

    @property
    def rule_name(self) -> str:
        """The name alerts carry: ``name`` if given, else the rule as written."""
        return self.name or f"{self.metric.value} {self.op} {self.threshold:g}"


class StorageSpec(SpecModel):
    """Where a queue shard keeps accepted items.

    ``sqlite`` (the default) writes each accepted batch to ``<directory>/<namespace>/
    <fleet>/<capability>-<shard>.sqlite3`` (WAL mode, one commit per put or ack batch)
    before acknowledging it, and reloads everything not acked when the shard restarts,
    including when the fleet is started again under the same namespace and name.
    ``sqlite_synchronous`` ``normal`` survives a kill -9 of the process; ``full`` also
    survives power loss (an fsync per commit). ``memory`` is faster (about 20% more
    tasks/s end to end on the core benchmark, BENCHMARKS.md) and loses the queue with
    the process: for tests and throwaway runs.
    """

    backend: StorageBackend = DEFAULT_STORAGE_BACKEND
    directory: str = Field(default=DEFAULT_QUEUE_DIRECTORY, min_length=1)
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    sqlite_cache_mib: int = Field(default=16, ge=1)


class KafkaIntakeSpec(SpecModel):
    """Consume tasks from a Kafka topic with a consumer group (``fleet.queue.kafka_intake``).

    Each message value is one JSON task. A partition's offset is committed only once
    every earlier task of that partition is finished (at-least-once; duplicates are
    absorbed by the ledger). Malformed messages go to ``dead_letter_topic`` (default
    ``<topic>.dlq``) with the reason; results go to ``results_topic`` when set.
    ``max_in_flight`` bounds tasks consumed but not finished (partitions pause beyond it).
    A fleet whose spec has this section runs ``consumers`` intake actors in the group
    (``fleet.runtime.kafka_intake_actor``); a task is finished once the ledger has its
    outcome, which the actors learn by polling the ledger every ``ledger_poll_s``.
    """

    bootstrap_servers: str = Field(min_length=1)
    topic: str = Field(min_length=1)
    group_id: str = Field(min_length=1)
    dead_letter_topic: str | None = Field(default=None, min_length=1)
    results_topic: str | None = Field(default=None, min_length=1)
    max_poll_records: int = Field(default=2000, ge=1)
    max_in_flight: int = Field(default=20_000, ge=1)
    commit_interval_s: float = Field(default=1.0, gt=0)
    session_timeout_s: float = Field(default=10.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    consumers: int = Field(default=DEFAULT_KAFKA_CONSUMERS, ge=1)
    ledger_poll_s: float = Field(default=DEFAULT_LEDGER_POLL_S, gt=0)

    @model_validator(mode="after")
    def _check(self) -> KafkaIntakeSpec:
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be below "
                f"session_timeout_s ({self.session_timeout_s})"
            )
        if self.dead_letter_topic == self.topic:
            raise ValueError(f"dead_letter_topic must differ from topic ({self.topic!r})")
        return self

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"


class BatchSpec(SpecModel):
    """Adaptive dispatcher batching: single items when the queue is shallow, up to
    ``max_items``/``max_bytes`` per call when it is deep.

    ``target_batches_in_flight`` splits the visible depth into that many batches. The
    default of 1 leases all that is visible (within capacity and the bounds): measured,
    splitting a shallow queue into smaller calls made per-call overhead the bottleneck
    and raised p95 at 80% load from 1.7 s to 9.6 s (BENCHMARKS.md). Raise it to spread
    a deep queue over more concurrent calls."""

    max_items: int = Field(default=256, ge=1)
    max_bytes: int = Field(default=1024 * 1024, ge=1)
    target_batches_in_flight: int = Field(default=1, ge=1)


class QueueSpec(SpecModel):
    """Per-capability work queues. Each capability gets ``shards`` queue actors.

    Discipline parameters: ``priority_aging_limit_s`` is the longest head start any
    priority buys: an item is never overtaken by one submitted more than that many
    seconds after it (None: strict priority, low priority may starve).
    ``utility_decay_per_s`` (value units lost per second waiting) or
    ``utility_half_life_s`` (seconds for the value to halve) make a utility queue prefer
    fresh work; tasks without a utility count as ``default_utility``.
    """

    discipline: Discipline = Discipline.FIFO
    shards: int = Field(default=2, ge=1)
    max_depth: int = Field(default=1_000_000, ge=1)
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)
    submit_timeout_s: float = Field(default=10.0, ge=0)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1)
    batch: BatchSpec = BatchSpec()

    priority_aging_limit_s: float | None = Field(default=DEFAULT_PRIORITY_AGING_LIMIT_S, gt=0)
    default_utility: float = DEFAULT_UTILITY
    utility_decay_per_s: float = Field(default=0.0, ge=0)
    utility_half_life_s: float | None = Field(default=None, gt=0)
    shard_by: ShardBy = ShardBy.SPREAD
    storage: StorageSpec = StorageSpec()
    alerts: tuple[QueueAlertRule, ...] = ()
    kafka: KafkaIntakeSpec | None = None

    @model_validator(mode="after")
    def _check_batch(self) -> QueueSpec:
        if self.batch.max_bytes < self.max_payload_bytes:
            raise ValueError(
                f"batch.max_bytes ({self.batch.max_bytes}) must be >= max_payload_bytes "
                f"({self.max_payload_bytes}) so that the largest task fits in one batch"
            )
        if self.utility_decay_per_s > 0 and self.utility_half_life_s is not None:
            raise ValueError(
                f"utility_decay_per_s ({self.utility_decay_per_s}) and utility_half_life_s "
                f"({self.utility_half_life_s}) are exclusive: "
                "choose linear or exponential decay"
            )
        names = [r.rule_name for r in self.alerts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"alert rule names must be unique; repeated: {dup}")
        return self
