"""Queue section: bounds, leases, disciplines, sharding, storage, alerts, payload limits
and dispatcher batching."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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


STORAGE_NODE_HEAD = "head"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only
_STORAGE_NODE_PATTERN = r"^(head|resource:[A-Za-z0-9_.:/-]+)$"


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
    node: str = STORAGE_NODE_HEAD
    """Where the actors that hold files (queue shards, ledger shards, controller, budget
    actor) run, so that a restarted one finds its files: ``head`` (the default: the
    head node, whose disk or volume holds ``directory``), or ``resource:<name>``: the
    node that has the custom resource ``<name>`` (``ray start --resources
    '{"<name>": 1}'``; give it to one node only, or to nodes that share ``directory``).
    Hosts and the dispatcher hold no files and run anywhere."""

    @field_validator("node")
    @classmethod
    def _check_node(cls, v: str) -> str:
        if not re.match(_STORAGE_NODE_PATTERN, v):
            raise ValueError(
                "not a storage node: use 'head' or 'resource:<name>' (a custom resource "
                "of the node that holds the storage directory)"
            )
        return v

    @property
    def node_resource(self) -> str:
        """The Ray resource every file-holding actor asks a sliver of."""
        if self.node == STORAGE_NODE_HEAD:
            return HEAD_NODE_RESOURCE
        return self.node.removeprefix("resource:")


class KafkaSecurityProtocol(str, Enum):
    """How the Kafka clients talk to the brokers (kafka-python's ``security_protocol``)."""

    PLAINTEXT = "PLAINTEXT"  # no TLS, no authentication (the default)
    SSL = "SSL"  # TLS; a client certificate (ssl_certfile + ssl_keyfile) authenticates
    SASL_PLAINTEXT = "SASL_PLAINTEXT"  # SASL authentication over an unencrypted connection
    SASL_SSL = "SASL_SSL"  # SASL authentication over TLS


class SaslMechanism(str, Enum):
    """The SASL mechanisms fleet supports (username + password)."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


_UNSUPPORTED_SASL = {
    "GSSAPI": "GSSAPI (Kerberos)",
    "OAUTHBEARER": "OAUTHBEARER",
}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SASL_PROTOCOLS = (KafkaSecurityProtocol.SASL_PLAINTEXT, KafkaSecurityProtocol.SASL_SSL)
_TLS_PROTOCOLS = (KafkaSecurityProtocol.SSL, KafkaSecurityProtocol.SASL_SSL)
_SASL_FIELDS = ("sasl_mechanism", "username", "password_env")
_TLS_FIELDS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_env")


def _check_env_name(value: str) -> str:
    # The value is never echoed: a password pasted here by mistake must not reach a log.
    if not _ENV_NAME_RE.match(value):
        raise ValueError(
            "must be the name of an environment variable (letters, digits and _, not "
            "starting with a digit), not the secret itself"
        )
    return value


EnvVarName = Annotated[
    str, Field(min_length=1, max_length=256), AfterValidator(_check_env_name)
]
"""The name of an environment variable that holds a secret (never the secret)."""


class KafkaSecuritySpec(SpecModel):
    """TLS and SASL for the Kafka clients of the intake (consumer, dead-letter and results
    producer), passed to kafka-python by ``fleet.queue.kafka_security``.

    ``protocol``: ``PLAINTEXT`` (the default, no TLS, no authentication), ``SSL``,
    ``SASL_PLAINTEXT`` or ``SASL_SSL``. The SASL protocols need ``sasl_mechanism``
    (``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``; GSSAPI and OAUTHBEARER are not
    supported), ``username`` and ``password_env``. Prefer ``SASL_SSL``: with
    ``SASL_PLAINTEXT`` and ``PLAIN`` the password crosses the network in clear.

    Secrets are never in the spec: ``password_env`` (the SASL password) and
    ``ssl_password_env`` (the password of an encrypted ``ssl_keyfile``) name environment
    variables, read by the process that opens the clients (the intake actors, i.e. on
    the Ray nodes), which fails with the variable's name if it is unset. The TLS
    options (for ``SSL``/``SASL_SSL``): ``ssl_cafile`` (PEM CA bundle to verify the
    brokers; default: the system's), ``ssl_certfile`` + ``ssl_keyfile`` (a client
    certificate, as a pair), ``ssl_check_hostname`` (verify the broker's name against
    its certificate). The files are paths on the nodes running the intake.
    """

    # Inputs stay out of validation errors: whatever is pasted here, e.g. a password in
    # place of a variable name, must not be printed back.

    protocol: KafkaSecurityProtocol = KafkaSecurityProtocol.PLAINTEXT
    sasl_mechanism: SaslMechanism | None = None
    username: str | None = Field(default=None, min_length=1)
    password_env: EnvVarName | None = None
    ssl_cafile: str | None = Field(default=None, min_length=1)
    ssl_certfile: str | None = Field(default=None, min_length=1)
    ssl_keyfile: str | None = Field(default=None, min_length=1)
    ssl_password_env: EnvVarName | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("protocol", "sasl_mechanism"):
            if isinstance(data.get(key), str):
                data[key] = data[key].strip().upper()
        mech = data.get("sasl_mechanism")
        if mech in _UNSUPPORTED_SASL:
            raise _field_errors(
                [
                    (
                        "sasl_mechanism",
                        f"{_UNSUPPORTED_SASL[mech]} is not supported; use PLAIN, "
                        "SCRAM-SHA-256 or SCRAM-SHA-512",
                    )
                ]
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> KafkaSecuritySpec:
        errors: list[tuple[str, str]] = []
        p = self.protocol.value
        if self.protocol in _SASL_PROTOCOLS:
            errors += [
                (f, f"required with protocol {p}")
                for f in _SASL_FIELDS
                if getattr(self, f) is None
            ]
        else:
            errors += [
                (f, f"only used with protocol SASL_PLAINTEXT or SASL_SSL, not {p}")
                for f in _SASL_FIELDS
                if getattr(self, f) is not None
            ]
        if self.protocol in _TLS_PROTOCOLS:
            if self.ssl_certfile is not None and self.ssl_keyfile is None:
                errors.append(
                    ("ssl_keyfile", "required with ssl_certfile (they come as a pair)")
                )
            if self.ssl_keyfile is not None and self.ssl_certfile is None:
                errors.append(
                    ("ssl_certfile", "required with ssl_keyfile (they come as a pair)")
                )
            if self.ssl_password_env is not None and self.ssl_keyfile is None:
                errors.append(("ssl_password_env", "only used with ssl_keyfile"))
        else:
            tls_set = [f for f in _TLS_FIELDS if getattr(self, f) is not None]
            # Only a switched-off check is flagged: the default (True) is in every dumped
            # spec, which the actors validate again.
            if not self.ssl_check_hostname:
                tls_set.append("ssl_check_hostname")
            errors += [
                (f, f"only used with protocol SSL or SASL_SSL, not {p}") for f in tls_set
            ]
        if errors:
            raise _field_errors(errors)
        return self

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in _SASL_PROTOCOLS

    @property
    def uses_tls(self) -> bool:
        return self.protocol in _TLS_PROTOCOLS


def _field_errors(errors: list[tuple[str, str]]) -> ValidationError:
    """One error per ``(field, reason)``, located at the field itself (pydantic prefixes
    the path of the enclosing sections), so the message reads ``...security.username:
    required with protocol SASL_SSL``. The input is never included."""
    return ValidationError.from_exception_data(
        "KafkaSecuritySpec",
        [
            InitErrorDetails(
                type=PydanticCustomError("kafka_security", reason),
                loc=(field,),
                input=None,
            )
            for field, reason in errors
        ],
        hide_input=True,
    )


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
    ``security`` sets TLS and SASL for every client (``KafkaSecuritySpec``; default:
    plaintext, no authentication).
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
    security: KafkaSecuritySpec = KafkaSecuritySpec()

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
