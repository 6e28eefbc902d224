"""Tasks and results.

``Task`` and ``Result`` are the validated, user-facing models. Inside the runtime a task
travels as an ``Item`` and an outcome as an ``Outcome``: named tuples that pickle in a
few microseconds, because every task crosses several actor boundaries and pydantic
models cost ten times more to serialize. Validation happens once, at submit.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, NamedTuple

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from fleet.spec.queues import DEFAULT_MAX_PAYLOAD_BYTES

IDEMPOTENT_PREFIX = "idem-"  # a task submitted with an idempotency_key gets this id
# Ids of tasks submitted through the HTTP ingress are scoped by the caller's tenant:
# ``@<tenant>:<id>``. Tenant names never hold ':' (fleet.security.keys.check_tenant), so
# two tenants' ids never meet, and the tenant of a task is read back from its id.
TENANT_ID_PREFIX = "@"
MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
# W3C trace-context ``traceparent``, version 00: ``00-<trace id>-<parent span id>-<flags>``
# in lowercase hex. The pattern is the task schema's (OpenAPI); all-zero ids, which it
# cannot exclude without lookarounds, are refused by ``to_item``.
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


class TaskRejected(ValueError):
    """A task refused at submit; ``field`` names what was wrong with it."""

    def __init__(self, field: str, reason: str, task_id: str | None = None):
        self.field = field
        self.reason = reason
        self.task_id = task_id
        where = f"task {task_id}: " if task_id else ""
        super().__init__(f"{where}{field}: {reason}")


class IdempotencyConflict(Exception):
    """A task's idempotency key is already taken by a task with another payload."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        keys = ", ".join(
            repr(split_scoped(i)[1].removeprefix(IDEMPOTENT_PREFIX)) for i in ids[:5]
        )
        more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        super().__init__(
            f"idempotency_key {keys}{more} already used with a different "
            "payload; use a new key for a different task"
        )

    def __reduce__(self):
        return (IdempotencyConflict, (self.ids,))


def payload_hash(payload: bytes) -> int:
    """A stable signed 64-bit hash of a task's encoded payload (idempotency checks)."""
    return int.from_bytes(
        hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True
    )


def scoped_id(tenant: str, task_id: str) -> str:
    """The fleet-wide id of tenant ``tenant``'s task ``task_id``."""
    return f"{TENANT_ID_PREFIX}{tenant}:{task_id}"


def split_scoped(task_id: str) -> tuple[str | None, str]:
    """(tenant, the tenant's own id) of a scoped id; (None, id) for an unscoped one."""
    if task_id.startswith(TENANT_ID_PREFIX):
        tenant, sep, rest = task_id[1:].partition(":")
        if sep:
            return tenant, rest
    return None, task_id


def tenant_of_id(task_id: str) -> str | None:
    """The tenant a task was submitted for through the ingress (None: not scoped)."""
    return split_scoped(task_id)[0]


TENANT_FIELD = "tenant"


def tenant_of(payload: Any) -> str | None:
    """A task's tenant: ``payload["tenant"]`` when the payload is an object with a
    string ``tenant``, else None (no tenant budget applies)."""
    if isinstance(payload, dict):
        t = payload.get(TENANT_FIELD)
        if isinstance(t, str):
            return t
    return None


def payload_tenant(payload: bytes) -> str | None:
    """``tenant_of`` an item's encoded payload (None also when it is not JSON)."""
    try:
        return tenant_of(orjson.loads(payload))
    except orjson.JSONDecodeError:
        return None


def cache_key_of(item: Item) -> str:
    """The key a degrade rule's cache files ``item`` under (its pool aside): its
    tenant, as its id names it (the HTTP ingress's) or else as its payload's ``tenant``
    does (budgets'), and its ``cache_key``; one tenant's answers never reach another."""
    tenant = tenant_of_id(item.id)
    if tenant is None:
        t = payload_tenant(item.payload)
        tenant = "" if t is None else f"payload:{t}"
    return f"{tenant}\x1f{item.cache_key}"


def is_idempotent_id(task_id: str) -> bool:
    """Whether the id was made from an ``idempotency_key`` (scoped to a tenant or not)."""
    return split_scoped(task_id)[1].startswith(IDEMPOTENT_PREFIX)


def id_is_generated(task: Task | dict[str, Any]) -> bool:
    """Whether ``to_item`` makes the task's id up (no id, no idempotency key given): a
    fresh id has no outcome yet, so submitting it needs no ledger lookup."""
    if isinstance(task, Task):
        return "id" not in task.model_fields_set and task.idempotency_key is None
    return task.get("id") is None and task.get("idempotency_key") is None


def split_known(
    items: list[Item], known: Mapping[str, Outcome | None]
) -> tuple[list[Item], dict[str, Outcome], list[str]]:
    """Split items to submit by what the ledger already holds for their ids (``known``:
    id -> outcome or None; an id not in it, such as a generated one, has none):
    (to queue, id -> recorded outcome, conflicting ids).

    A recorded id is not run again: its outcome is the answer. An idempotency key
    recorded with another payload is a conflict (the same key must mean the same task).
    """
    fresh: list[Item] = []
    existing: dict[str, Outcome] = {}
    conflicts: list[str] = []
    for it in items:
        o = known.get(it.id)
        if o is None:
            fresh.append(it)
        elif (
            o.payload_hash is not None
            and is_idempotent_id(it.id)
            and o.payload_hash != payload_hash(it.payload)
        ):
            conflicts.append(it.id)
        else:
            existing[it.id] = o
    return fresh, existing, conflicts


def _integral(v: Any) -> Any:
    """JSON's integers include 4.0 (JSON Schema's ``integer`` does): take it as 4."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


class Task(BaseModel):
    """One unit of work for an agent with the given capability.

    ``deadline_unix_s`` is an absolute wall-clock time; ``utility`` is the value of
    completing the task; tasks sharing an ``affinity_key`` prefer the same agent; a
    task with an ``idempotency_key`` is accepted once, however often it is submitted.
    Tasks sharing a ``cache_key`` (of one tenant and pool) ask the same question: while
    their pool's degrade rule answers from its cache (``pools[].degrade.from_cache``),
    a new one (without an id of its own) is answered with the newest recent result of
    that key.
    ``traceparent`` (W3C trace context, ``00-<trace id>-<span id>-<flags>``) makes the
    task's spans children of the submitter's span (``fleet.observability.tracing``).
    """

    # Strict: a field takes its own JSON type only (no "5" for 5, no false for 0.0), so
    # what the OpenAPI schema allows is exactly what is accepted.
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    capability: str = Field(min_length=1)
    priority: Annotated[int, BeforeValidator(_integral)] = Field(
        default=DEFAULT_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY
    )
    deadline_unix_s: float | None = Field(default=None, allow_inf_nan=False)
    utility: float | None = Field(default=None, allow_inf_nan=False)
    affinity_key: str | None = Field(default=None, max_length=256)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=128)
    payload: Any = None
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)
    cache_key: str | None = Field(default=None, min_length=1, max_length=256)


class TaskStatus(str, Enum):
    COMPLETED = "completed"
    FAILED = "failed"


class Result(BaseModel):
    """The recorded outcome of a task. Failed results carry ``reason`` and ``error``."""

    task_id: str
    status: TaskStatus
    output: Any = None
    reason: str | None = None
    error: str | None = None
    agent_id: str | None = None
    pool: str | None = None
    deliveries: int = 1
    submitted_unix_s: float
    started_unix_s: float | None = None
    finished_unix_s: float
    latency_s: float
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # Run by a pool's fallback (``pools[].degrade``): the rule that sent it there.
    degraded: bool = False
    degraded_rule: str | None = None


class Item(NamedTuple):
    """A validated task as it waits in a queue (payload already encoded as JSON)."""

    id: str
    capability: str
    priority: int
    payload: bytes
    submitted_unix_s: float
    deadline_unix_s: float | None = None
    utility: float | None = None
    affinity_key: str | None = None
    deliveries: int = 0
    # After ``deliveries``, so positional constructions that stop there keep working.
    traceparent: str | None = None
    # Sent to its pool's fallback by a degrade rule (``pools[].degrade``): the rule.
    degraded: str | None = None
    # Times a run of it was cancelled to make room for a more urgent task (``pools[].
    # preemption``): kept by its queue shard with the item, so a restarted dispatcher
    # still knows when ``max_preemptions`` makes it no longer preemptible.
    preemptions: int = 0
    cache_key: str | None = None  # ``Task.cache_key``

    @property
    def size_bytes(self) -> int:
        return len(self.payload) + len(self.id) + 64


class Outcome(NamedTuple):
    """What the runtime records for a task: the wire form of ``Result``."""

    task_id: str
    ok: bool
    output: bytes | None  # JSON
    reason: str | None
    error: str | None
    agent_id: str | None
    pool: str | None
    deliveries: int
    submitted_unix_s: float
    started_unix_s: float | None
    finished_unix_s: float
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # The task's payload hash when it has an idempotency key (``idem-`` ids): a later
    # submission of the key with another payload is refused, not answered with this.
    payload_hash: int | None = None
    degraded: str | None = None  # the item's degrade rule (``Item.degraded``)
    # A completed task's ``cache_key_of`` (its tenant and ``cache_key``): its ledger
    # shard keeps the newest of each key in memory (not stored) for a degrade rule that
    # answers from its cache.
    cache_key: str | None = None

    def to_result(self) -> Result:
        return Result(
            task_id=self.task_id,
            status=TaskStatus.COMPLETED if self.ok else TaskStatus.FAILED,
            output=orjson.loads(self.output) if self.output is not None else None,
            reason=self.reason,
            error=self.error,
            agent_id=self.agent_id,
            pool=self.pool,
            deliveries=self.deliveries,
            submitted_unix_s=self.submitted_unix_s,
            started_unix_s=self.started_unix_s,
            finished_unix_s=self.finished_unix_s,
            latency_s=self.finished_unix_s - self.submitted_unix_s,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_usd=self.cost_usd,
            degraded=self.degraded is not None,
            degraded_rule=self.degraded,
        )


def failed_outcome(
    item: Item,
    reason: str,
    error: str,
    pool: str | None = None,
    agent_id: str | None = None,
    started_unix_s: float | None = None,
    now_unix_s: float | None = None,
) -> Outcome:
    """The outcome of a task that could not be completed, with the reason why."""
    return Outcome(
        task_id=item.id,
        ok=False,
        output=None,
        reason=reason,
        error=error,
        agent_id=agent_id,
        pool=pool,
        deliveries=item.deliveries,
        submitted_unix_s=item.submitted_unix_s,
        started_unix_s=started_unix_s,
        finished_unix_s=time.time() if now_unix_s is None else now_unix_s,
        degraded=item.degraded,
    )


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<task>"
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return field, msg


def to_item(
    task: Task | dict[str, Any],
    capabilities: frozenset[str] | set[str],
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    now_unix_s: float | None = None,
    tenant: str | None = None,
) -> Item:
    """Validate one task for submission and encode it for the queue.

    Raises TaskRejected naming the field at fault: unknown capability, priority out of
    range, payload too large or not JSON-serializable, a deadline already past, a
    ``traceparent`` with an all-zero trace or span id. With a ``tenant`` (the HTTP
    ingress's caller) the item's id is scoped to it (``scoped_id``); without one, an id
    that looks scoped is refused.
    """
    if not isinstance(task, Task):
        if not isinstance(task, dict):
            raise TaskRejected("<task>", f"expected a JSON object, got {type(task).__name__}")
        try:
            task = Task.model_validate(task)
        except ValidationError as exc:
            raise TaskRejected(*_first_error(exc), task_id=str(task.get("id") or "")) from None
    if task.capability not in capabilities:
        raise TaskRejected(
            "capability",
            f"unknown capability {task.capability!r}; "
            f"this fleet serves {sorted(capabilities)}",
            task.id,
        )
    try:
        payload = orjson.dumps(task.payload)
    except TypeError as exc:
        raise TaskRejected("payload", f"not JSON-serializable: {exc}", task.id) from None
    if len(payload) > max_payload_bytes:
        raise TaskRejected(
            "payload",
            f"{len(payload)} bytes encoded, over the limit of {max_payload_bytes}",
            task.id,
        )
    now = time.time() if now_unix_s is None else now_unix_s
    if task.deadline_unix_s is not None and task.deadline_unix_s <= now:
        raise TaskRejected(
            "deadline_unix_s",
            f"deadline_exceeded: {task.deadline_unix_s} is already past (now {now:.3f})",
            task.id,
        )
    if task.traceparent is not None:
        _check_traceparent(task.traceparent, task.id)
    task_id = f"{IDEMPOTENT_PREFIX}{task.idempotency_key}" if task.idempotency_key else task.id
    if tenant is not None:
        task_id = scoped_id(tenant, task_id)
    elif task_id.startswith(TENANT_ID_PREFIX):
        raise TaskRejected(
            "id",
            f"ids starting with {TENANT_ID_PREFIX!r} are reserved for the tasks of the "
            "HTTP ingress's tenants",
            task.id,
        )
    return Item(
        id=task_id,
        capability=task.capability,
        priority=task.priority,
        payload=payload,
        submitted_unix_s=now,
        deadline_unix_s=task.deadline_unix_s,
        utility=task.utility,
        affinity_key=task.affinity_key,
        traceparent=task.traceparent,
        cache_key=task.cache_key,
    )


def _check_traceparent(traceparent: str, task_id: str) -> None:
    # The format is the Task field's pattern; W3C makes all-zero ids invalid too.
    if traceparent[3:35] == _ZERO_TRACE_ID or traceparent[36:52] == _ZERO_SPAN_ID:
        raise TaskRejected(
            "traceparent", "trace id and parent span id must not be all zeros", task_id
        )


def parse_task_json(line: str | bytes, where: str = "<input>") -> dict[str, Any]:
    """Decode one JSON task, raising TaskRejected on malformed JSON."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise TaskRejected(where, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TaskRejected(where, f"expected a JSON object, got {type(data).__name__}")
    return data


def item_to_task(item: Item) -> Task:
    """Rebuild the user-facing Task an agent receives (no re-validation)."""
    return Task.model_construct(
        id=item.id,
        capability=item.capability,
        priority=item.priority,
        deadline_unix_s=item.deadline_unix_s,
        utility=item.utility,
        affinity_key=item.affinity_key,
        idempotency_key=None,
        payload=orjson.loads(item.payload),
        traceparent=item.traceparent,
        cache_key=item.cache_key,
    )
