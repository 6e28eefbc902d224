"""The fleet's HTTP ingress: a FastAPI app served as a Ray Serve deployment.

Every route but ``/healthz`` needs an API key (``Authorization: Bearer <key>``; see
``fleet.security``): the key names the caller's tenant and roles. Task ids are the
tenant's own: the same id from two tenants names two tasks (inside the fleet a task's
id is ``@<tenant>:<id>``, ``fleet.task.scoped_id``), a tenant reads and cancels only its
own tasks, and the tenant of a task's budget is its key's. Limits (``ingress.limits``)
bound the body, the batch, the tenant's request rate and its long-polls.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``POST /tasks``: one task (a JSON object) or a batch (a JSON array of tasks). 202 with
  the accepted ids. A batch is all-or-nothing at validation: any invalid task makes the
  whole request 422, listing every bad task by index and field, and nothing is queued.
  A full queue makes the request wait up to ``submit_wait_s``, then 429 with a
  ``Retry-After`` header and, in the body, which tasks were accepted and which were not
  (resubmit those with the ids given: a pending id is taken once, and the ledger keeps one
  outcome per id). A pool with admission control (``pools[].admission``) refuses at
  once what would wait too long: 429 (503 when the pool cannot run at all) with a
  ``Retry-After`` computed from its drain rate, and each refused task's id, ``reason``
  (``shed``, ``unavailable``) and predicted wait in ``not_queued``.
- ``GET /tasks/{id}``: ``pending`` (accepted, no outcome recorded yet) or the recorded
  result; 404 for an id this tenant never submitted. ``?wait_s=N`` waits up to N seconds
  (at most ``max_wait_s``) for the outcome before answering.
- ``GET /tasks?status=...&limit=N&cursor=C``: the tenant's tasks, a page at a time:
  pending ones, then finished ones newest first (``fleet.runtime.listing``).
- ``DELETE /tasks/{id}``: cancel a task that has not started (recorded as failed with
  reason ``cancelled``); 409 when it is running or already finished.
- ``GET /status``: for an ``admin`` key the fleet's pools, agents, hosts and queues (as
  ``fleet status``); for others, the tenant's own pending tasks per capability.
- ``GET /metrics``: Prometheus metrics (``admin``).
- ``GET /healthz``: 200 when every control actor is ALIVE and the ledger answers; 503
  naming each actor that is not (restarting, dead, missing, pending) and its state.

Invalid input is a 422 naming the field (``detail[].loc``), never a 500. The replicas
talk to the fleet through its named actors (found with ``FleetClient.connect``) and
never block their event loop on an actor call. Serve autoscales the replicas on ongoing
requests with its default policy.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' parameter
# types at runtime, and Serve's ingress wrapper cannot resolve string annotations.
import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from typing import Annotated, Any, Literal

import ray
from fastapi import Body, Depends, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Discriminator, Field, Tag
from ray import serve

import fleet
from fleet.policy.admission import DEADLINE_EXCEEDED, SHED, UNAVAILABLE
from fleet.policy.backoff import attempt_state, backoff_wait
from fleet.policy.sharding import shard_of
from fleet.queue.lease_queue import QueueFull
from fleet.runtime.admission_gate import AdmissionGate, Refused, retry_after_s
from fleet.runtime.ledger import LedgerClient
from fleet.runtime.lifecycle import actor_states, not_alive
from fleet.runtime.listing import MAX_CURSOR_CHARS, BadCursor, Cursor, list_tasks
from fleet.runtime.names import Names
from fleet.runtime.ratelimit import LeasedTokens, limiter_actor
from fleet.security.asgi import Guard, GuardConfig
from fleet.security.keys import KeyRing, Principal, Role
from fleet.security.redact import Redactor, redact_logs, redactor_for
from fleet.spec.backoff import BackoffSpec
from fleet.spec.ingress import AuthMode, check_exposure
from fleet.task import (
    IdempotencyConflict,
    Item,
    Outcome,
    Result,
    Task,
    TaskRejected,
    id_is_generated,
    scoped_id,
    split_known,
    split_scoped,
    to_item,
)

log = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "ingress"
CONFLICT_PREFIX = "conflict:"
MAX_BATCH_TASKS = 10_000  # the schema's bound; ingress.limits.max_batch_tasks is the spec's
DEFAULT_SUBMIT_WAIT_S = 1.0
DEFAULT_PAGE, MAX_PAGE = 50, 100  # tasks per page of GET /tasks (outputs included)
DEFAULT_RETRY_AFTER_S = 1
HEALTH_TIMEOUT_S = 2.0
PUT_BACKOFF_MAX_S = 0.25
# A full shard is asked again after fleet's one backoff rule (no jitter, as FleetClient).
PUT_BACKOFF = BackoffSpec(
    initial_backoff_s=0.01, max_backoff_s=PUT_BACKOFF_MAX_S, jitter_ratio=0.0
)
# Serve's default autoscaling policy, on ongoing requests per replica.
INGRESS_AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}
INGRESS_MAX_ONGOING_REQUESTS = 128
# A long-poll asks the ledger again after fleet's backoff rule: 50 ms, doubling, 1 s cap.
POLL_BACKOFF = BackoffSpec(initial_backoff_s=0.05, max_backoff_s=1.0, jitter_ratio=0.0)


def _body_kind(value: Any) -> str:
    return "batch" if isinstance(value, list) else "task"


TaskOrBatch = Annotated[
    Annotated[Task, Tag("task")]
    | Annotated[list[Task], Tag("batch"), Field(min_length=1, max_length=MAX_BATCH_TASKS)],
    Discriminator(_body_kind),
]

BODY_EXAMPLES = {
    "one task": {
        "value": {"capability": "support", "payload": {"question": "Where is order #1234?"}}
    },
    "a batch": {
        "value": [
            {
                "capability": "support",
                "id": "t-1",
                "priority": 7,
                "payload": {"question": "Can I return shoes?"},
            },
            {"capability": "support", "id": "t-2", "payload": {}},
        ]
    },
}


class TaskState(BaseModel):
    id: str
    status: Literal["pending", "completed", "failed"]
    result: Result | None = None


class TaskPage(BaseModel):
    """A page of the tenant's tasks; pass ``next_cursor`` back for the next (null: the
    end). A page may hold fewer than ``limit`` tasks before the end."""

    tasks: list[TaskState]
    next_cursor: str | None = None


class Problem(BaseModel):
    """What was wrong (401, 403, 404, 409, 413, 429, 503); a 429 may say when to retry."""

    detail: str
    retry_after_s: int | None = None


def _guarded(own: dict[int, dict[str, Any]] | None = None) -> dict[int | str, dict[str, Any]]:
    """The answers the guard may give on any protected route, plus the route's own."""
    out: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem, "description": "no key, or not a valid one"},
        403: {"model": Problem, "description": "the key does not have the route's role"},
        413: {"model": Problem, "description": "request body too large"},
        429: {"model": Problem, "description": "the tenant is over its request rate"},
        503: {"model": Problem, "description": "the ingress or its rate limiter is starting"},
    }
    out.update(own or {})
    return out


class Accepted(BaseModel):
    """Tasks accepted; poll ``GET /tasks/{id}`` for each. ``results`` holds the recorded
    outcome of every accepted id that already had one: it was not run again."""

    ids: list[str]
    results: list[TaskState] = []


class NotQueued(BaseModel):
    """A task of the request that was not queued: ``index`` in the request, its ``id``
    (resubmit it with this id: nothing of it was queued), and, when admission control
    refused it, the ``reason`` (``shed``: predicted to wait past the pool's limit or its
    deadline; ``unavailable``: the pool cannot run now; ``deadline_exceeded``) and the
    ``predicted_wait_s``."""

    index: int
    id: str
    reason: str | None = None
    predicted_wait_s: float | None = None


class ConflictingTask(BaseModel):
    """A task of the request whose idempotency key is taken: ``index`` in the request."""

    index: int
    id: str


class Conflict(BaseModel):
    """An idempotency key was already used with another payload; nothing conflicting
    was queued (``accepted`` lists what other shards took, if any)."""

    detail: str
    conflicts: list[ConflictingTask]
    accepted: list[str]


class Backpressure(BaseModel):
    """Some or all tasks were not queued (the queue stayed full, or admission control
    refused them); retry those later, with the same ids. ``results``: the recorded
    outcome of each task of the request that already had one."""

    detail: str
    accepted: list[str]
    not_queued: list[NotQueued]
    retry_after_s: int
    results: list[TaskState] = []


class Health(BaseModel):
    """``ok`` (200) with the outcomes recorded, or ``unhealthy`` (503) with why: each
    control actor that is not ALIVE, by state (RESTARTING, DEAD, MISSING, ...)."""

    status: Literal["ok", "unhealthy"]
    fleet: str
    recorded: int | None = None
    detail: str | None = None
    not_alive: dict[str, str] | None = None


API_TITLE = "fleet"
API_DESCRIPTION = (
    "Submit tasks to a fleet of agents, read their results and the fleet's status. "
    "Every route but /healthz needs Authorization: Bearer <key>."
)


async def _known_query(request: Request) -> None:
    """A query parameter the route does not declare is a 422 naming it, as an unknown
    body field is: a misspelt ``wait_s`` or ``status`` must not pass silently.

    ``async`` though it awaits nothing: FastAPI runs a plain function dependency in a
    worker thread, and on every request that thread hand-off (a thread started, two
    condition waits) took a fifth of the ingress's event loop at 5x load (py-spy)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    known = {p.alias for p in dependant.query_params} if dependant is not None else set()
    unknown = [k for k in request.query_params if k not in known]
    if unknown:
        raise RequestValidationError(
            [
                {"type": "extra_forbidden", "loc": ["query", k], "msg": "unknown parameter"}
                for k in unknown
            ]
        )


# The schema and docs are served by the Ingress itself (``openapi``, ``docs``): the
# schema names this fleet's capabilities, which only the replica knows.
api = FastAPI(
    title=API_TITLE,
    version=fleet.__version__,
    description=API_DESCRIPTION,
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
    dependencies=[Depends(_known_query)],
)
# The replica's guard (keys, limiter, limits): set by Ingress.__init__; one replica per
# process, so the module's app is the replica's.
_GUARD: GuardConfig | None = None
api.add_middleware(Guard, config=lambda: _GUARD)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field at fault, without echoing the input back: an input may
    hold a secret, or a value JSON cannot carry (NaN), which would turn the answer into
    a 500."""
    errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


def _principal(request: Request) -> Principal:
    who: Principal | None = getattr(request.state, "principal", None)
    assert who is not None, "the guard sets it before any protected route"
    return who


def _is_queue_full(exc: BaseException) -> bool:
    return isinstance(exc, QueueFull) or isinstance(getattr(exc, "cause", None), QueueFull)


def _conflict_of(exc: Any) -> IdempotencyConflict | None:
    if isinstance(exc, IdempotencyConflict):
        return exc
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, IdempotencyConflict) else None


def _state(task_id: str, outcome: Outcome, redact: Redactor) -> TaskState:
    """A task's state as its submitter sees it: its own id, not the fleet-wide one, and
    no secret in its error text."""
    result = outcome.to_result()
    result.task_id = task_id
    if result.error:
        result.error = redact.text(result.error)
    return TaskState(id=task_id, status=result.status.value, result=result)


def _client_id(task_id: str) -> str:
    return split_scoped(task_id)[1]


def _fleet_id(tenant: str, task_id: str) -> str:
    """The fleet-wide id of a caller's task (unscoped when authentication is off)."""
    return scoped_id(tenant, task_id) if tenant else task_id


def _bad_cursor(why: str) -> JSONResponse:
    return _validation_error(
        [{"type": "cursor_rejected", "loc": ["query", "cursor"], "msg": f"bad cursor: {why}"}]
    )


def _no_such_task() -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": "no such task"})


# The helpers below are defined above the Ingress class: Serve freezes the class, with
# the module names it uses, when the class is decorated, so a name defined below it is
# missing in the replica.
def _serve_http_host() -> str:
    """The host Serve's HTTP proxies bind (from Serve's controller)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return str(ray.get(controller.get_http_config.remote(), timeout=30).host)


def _fleet_schema(routes: Any, capabilities: list[str], root_path: str) -> dict[str, Any]:
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=API_TITLE,
        version=fleet.__version__,
        description=API_DESCRIPTION,
        routes=routes,
        servers=[{"url": root_path}] if root_path else None,
    )
    comps = schema.setdefault("components", {})
    comps["schemas"]["Task"]["properties"]["capability"]["enum"] = capabilities
    comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op["security"] = [] if path == "/healthz" else [{"bearer": []}]
    return schema


def _validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    # The same shape as FastAPI's own 422 body, so clients parse one format.
    return JSONResponse(status_code=422, content={"detail": errors})


@serve.deployment(
    name=INGRESS_DEPLOYMENT,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
    autoscaling_config=INGRESS_AUTOSCALING,
)
@serve.ingress(api)
class Ingress:
    """One ingress replica, bound to the fleet ``name`` in ``namespace``."""

    def __init__(
        self,
        name: str = "fleet",
        namespace: str = "fleet",
        submit_wait_s: float = DEFAULT_SUBMIT_WAIT_S,
        retry_after_s: int = DEFAULT_RETRY_AFTER_S,
    ):
        from fleet.runtime.client import FleetClient

        # (Module state set here is the replica's: Serve pickles this class by value, so
        # this global and the guard's lambda share one namespace per replica.)
        global _GUARD
        self._fc = FleetClient.connect(name, namespace)
        spec = self._fc.spec
        self._redact = redactor_for(spec)
        redact_logs(self._redact)
        names = Names(spec.name)
        self._caps = frozenset(spec.capabilities)
        self._max_payload_bytes = spec.queues.max_payload_bytes
        self._limits = spec.ingress.limits
        self._schema: dict[str, Any] | None = None
        self._long_polls: dict[str, int] = defaultdict(int)
        _GUARD = self._guard(spec)
        self._ledger = LedgerClient.for_spec(spec)
        self._shards = {
            cap: [
                ray.get_actor(names.shard(cap, i), namespace=spec.namespace)
                for i in range(spec.queues.shards)
            ]
            for cap in spec.capabilities
        }
        self._n_shards = spec.queues.shards
        self._submit_wait_s = submit_wait_s
        self._retry_after_s = retry_after_s
        self._admission = AdmissionGate(spec, self._fc._ctl)

    @staticmethod
    def _guard(spec: Any) -> GuardConfig:
        """Keys (or, with auth off, the proof that nothing beyond loopback can call
        us), and the tenants' shared rate limiter."""
        auth, limits = spec.ingress.auth, spec.ingress.limits
        if auth.mode is AuthMode.NONE:
            check_exposure(auth, _serve_http_host())
            log.warning(
                "fleet %s: the HTTP ingress runs WITHOUT authentication "
                "(ingress.auth.mode: none); it listens on loopback only",
                spec.name,
            )
            return GuardConfig(None, None, limits.max_body_bytes)
        path = auth.resolved_keys_file(spec.name)
        keys = KeyRing(path, auth.reload_s, time.monotonic)
        if keys.error:
            log.warning("fleet %s: %s", spec.name, keys.error)
        actor = limiter_actor(
            spec.name, spec.namespace, limits.tenant_requests_per_s, limits.tenant_burst
        )
        tokens = LeasedTokens(actor, limits.tenant_requests_per_s, limits.tenant_burst)
        return GuardConfig(keys, tokens, limits.max_body_bytes)

    # -- submit --------------------------------------------------------------------
    @api.post(
        "/tasks",
        status_code=202,
        response_model=Accepted,
        responses=_guarded(
            {
                200: {"model": Accepted, "description": "every task already has an outcome"},
                409: {
                    "model": Conflict,
                    "description": "idempotency key used with another payload",
                },
                413: {"model": Problem, "description": "body or batch too large"},
                422: {"description": "invalid task(s): nothing was queued"},
                429: {
                    "model": Backpressure | Problem,
                    "description": "queue full, or the tenant over its request rate",
                },
                503: {
                    "model": Backpressure | Problem,
                    "description": "fleet unreachable, or the ingress starting",
                },
            }
        ),
    )
    async def submit(
        self,
        request: Request,
        body: Annotated[TaskOrBatch, Body(openapi_examples=BODY_EXAMPLES)],
    ) -> Any:
        """Queue one task (a JSON object) or a batch (a JSON array, all or nothing).

        A task whose id or ``idempotency_key`` already has a recorded outcome is not run
        again: it is answered with that outcome (200 when every task of the request
        has one, else 202 with them in ``results``). The same ``idempotency_key`` with a
        different payload is refused with 409 naming the key.
        """
        tenant = _principal(request).tenant or None
        batch = isinstance(body, list)
        tasks = body if batch else [body]
        if len(tasks) > self._limits.max_batch_tasks:
            return JSONResponse(
                status_code=413,
                content={
                    "detail": f"a batch of {len(tasks)} tasks is over the limit of "
                    f"{self._limits.max_batch_tasks} (ingress.limits.max_batch_tasks)"
                },
            )
        items, errors = [], []
        for k, task in enumerate(tasks):
            try:
                items.append(to_item(task, self._caps, self._max_payload_bytes, tenant=tenant))
            except TaskRejected as exc:
                loc = ["body", "batch", k, exc.field] if batch else ["body", "task", exc.field]
                errors.append({"type": "task_rejected", "loc": loc, "msg": exc.reason})
        if errors:
            return _validation_error(errors)
        # Ids made up here have no outcome: only the clients' own ids are looked up.
        # The ledger first: a task with an outcome is answered with it, never refused.
        ask = [it.id for it, t in zip(items, tasks) if not id_is_generated(t)]
        fresh, existing, conflicts = split_known(
            items, dict(zip(ask, await self._ledger.get_async(ask)))
        )
        if conflicts:
            return self._conflict(items, conflicts, [])
        await self._admission.refresh_async()
        # A degrade rule answering from its pool's cache answers what it can first (of
        # the tasks whose ids were made up here: see AdmissionGate.answer_from_cache).
        made_up = {it.id for it, t in zip(items, tasks) if id_is_generated(t)}
        if cached := await self._admission.answer_from_cache_async(
            fresh, self._ledger, made_up
        ):
            existing.update(cached)
            fresh = [it for it in fresh if it.id not in cached]
        results = [
            _state(_client_id(it.id), existing[it.id], self._redact)
            for it in items
            if it.id in existing
        ]
        order = [k for k, it in enumerate(items) if it.id not in existing]  # fresh's places
        fresh, refused = self._admission.split(fresh)
        if refused:  # not queued: what admission control refused, with why
            out = {r.index for r in refused}
            refused = [dataclasses.replace(r, index=order[r.index]) for r in refused]
            order = [k for j, k in enumerate(order) if j not in out]
        not_queued, error, walled = await self._enqueue(fresh)
        if walled:  # over their tenant's bulkhead (bulkheads): refused, not queued
            refused = sorted(
                refused
                + self._admission.bulkhead_refused(
                    [fresh[j] for j in walled], {fresh[j].id: order[j] for j in walled}
                ),
                key=lambda r: r.index,
            )
        not_queued = [order[j] for j in not_queued]
        if refused:
            self._admission.report_later()
            if error.startswith(CONFLICT_PREFIX):
                error = "idempotency conflict: " + ", ".join(
                    _client_id(i) for i in error.removeprefix(CONFLICT_PREFIX).split("\n") if i
                )
            return self._refused(items, refused, not_queued, error, results)
        if error.startswith(CONFLICT_PREFIX):
            refused = set(not_queued)
            ids = [i for i in error.removeprefix(CONFLICT_PREFIX).split("\n") if i]
            return self._conflict(
                items, ids, [it.id for k, it in enumerate(items) if k not in refused]
            )
        if not not_queued:
            accepted = Accepted(ids=[_client_id(it.id) for it in items], results=results)
            if not fresh:  # every task already has its outcome: nothing new was queued
                return JSONResponse(status_code=200, content=accepted.model_dump(mode="json"))
            return accepted
        refused = set(not_queued)
        report = Backpressure(
            detail=error,
            accepted=[_client_id(it.id) for k, it in enumerate(items) if k not in refused],
            not_queued=[NotQueued(index=k, id=_client_id(items[k].id)) for k in not_queued],
            retry_after_s=self._retry_after_s,
        )
        status = 429 if error.startswith("queue full") else 503
        return JSONResponse(
            status_code=status,
            content=report.model_dump(),
            headers={"Retry-After": str(self._retry_after_s)},
        )

    def _refused(
        self,
        items: list[Item],
        refused: list[Refused],
        not_queued: list[int],
        error: str,
        results: list[TaskState] | None = None,
    ) -> JSONResponse:
        """429 (503 when a pool cannot run at all, or the queue failed) for tasks
        admission control refused, with those the queue could not take
        (``not_queued``, ``error``) beside them and the recorded outcomes of the
        request's tasks that had one (``results``)."""
        out = {r.index for r in refused} | set(not_queued)
        retry = [r for r in refused if r.reason != DEADLINE_EXCEEDED]
        wait = retry_after_s(retry)
        if not_queued:
            wait = max(wait, self._retry_after_s)
        unavailable = any(r.reason == UNAVAILABLE for r in refused) or (
            bool(error) and not error.startswith("queue full")
        )
        shed = sum(r.reason == SHED for r in refused)
        late = len(refused) - len(retry)
        report = Backpressure(
            detail="; ".join(
                x
                for x in (
                    f"{len(refused)} task(s) refused by admission control "
                    f"({shed} shed: predicted to wait past the pool's limit)"
                    + (
                        "; resubmit them with the same ids after Retry-After seconds"
                        if retry
                        else ""
                    ),
                    f"{late} would miss their deadline (deadline_exceeded: do not retry)"
                    if late
                    else "",
                    "a pool cannot run tasks now" if unavailable else "",
                    error,
                )
                if x
            ),
            accepted=[_client_id(it.id) for k, it in enumerate(items) if k not in out],
            not_queued=sorted(
                [
                    NotQueued(
                        index=r.index,
                        id=_client_id(r.id),
                        reason=r.reason,
                        predicted_wait_s=r.predicted_wait_s,
                    )
                    for r in refused
                ]
                + [NotQueued(index=k, id=_client_id(items[k].id)) for k in not_queued],
                key=lambda n: n.index,
            ),
            retry_after_s=wait,
            results=results or [],
        )
        return JSONResponse(
            status_code=503 if unavailable else 429,
            content=report.model_dump(mode="json"),
            headers={"Retry-After": str(wait)},
        )

    def _conflict(
        self, items: list[Item], ids: list[str], accepted: list[str]
    ) -> JSONResponse:
        bad = set(ids)
        report = Conflict(
            detail=str(IdempotencyConflict([_client_id(i) for i in ids])),
            accepted=[_client_id(i) for i in accepted],
            conflicts=[
                ConflictingTask(index=k, id=_client_id(it.id))
                for k, it in enumerate(items)
                if it.id in bad
            ],
        )
        return JSONResponse(status_code=409, content=report.model_dump())

    async def _enqueue(self, items: list[Item]) -> tuple[list[int], str, list[int]]:
        """Put items on their shards; returns the indices not queued and why, and the
        indices refused at their tenant's bulkhead.

        Each shard's ``put_within`` is all or nothing but for the bulkhead's refusals,
        so an item is either accepted (and will get an outcome) or listed as not queued
        or refused: never half-submitted.
        """
        walled: list[int] = []
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for k, it in enumerate(items):
            # The shard FleetClient.submit would pick, so an id lands in one place.
            groups[(it.capability, shard_of(it.id, self._n_shards))].append(k)
        pending = list(groups.items())
        deadline = time.monotonic() + self._submit_wait_s
        wait = backoff_wait(PUT_BACKOFF, None)
        tries = 0
        while True:
            now = time.time()  # latency counts from the moment fleet is handed a task
            results = await asyncio.gather(
                *(
                    self._shards[cap][s].put_within.remote(
                        [items[k]._replace(submitted_unix_s=now) for k in idx]
                    )
                    for (cap, s), idx in pending
                ),
                return_exceptions=True,
            )
            retry, failure = [], ""
            conflicts = [i for res in results if (c := _conflict_of(res)) for i in c.ids]
            if conflicts:  # refused whole by its shard: report it, queue no more
                left = sorted(
                    k
                    for (_, idx), res in zip(pending, results)
                    if isinstance(res, BaseException)
                    for k in idx
                )
                return left, CONFLICT_PREFIX + "\n".join(conflicts), walled
            for entry, res in zip(pending, results):
                if not isinstance(res, BaseException):
                    if res:
                        out = set(res)
                        walled += [k for k in entry[1] if items[k].id in out]
                    continue
                retry.append(entry)
                if not _is_queue_full(res):
                    failure = failure or await self._why_not_queued(entry, res)
            pending = retry
            if not pending:
                return [], "", sorted(walled)
            if failure or time.monotonic() >= deadline:
                left = sorted(k for _, idx in pending for k in idx)
                return (
                    left,
                    failure
                    or (
                        f"queue full: {len(left)} task(s) not queued after waiting "
                        f"{self._submit_wait_s:g}s; retry them after Retry-After seconds"
                    ),
                    sorted(walled),
                )
            tries += 1
            await asyncio.sleep(wait(attempt_state(tries)))

    async def _why_not_queued(
        self, entry: tuple[tuple[str, int], list[int]], exc: BaseException
    ) -> str:
        """Why a failed put was not queued: "" if the shard was full, else the fault.

        A shard's QueueFull can reach us as an exception Ray could not deserialize,
        so the shard itself is asked: a shard that answers with too little room was full.
        """
        (cap, s), idx = entry
        try:
            room = await self._shards[cap][s].room.remote()
        except Exception as err:
            return f"fleet unreachable: queue shard {cap}/{s}: {type(err).__name__}"
        if room < len(idx):
            return ""
        return f"queue shard {cap}/{s} failed: {type(exc).__name__}"

    # -- the schema ----------------------------------------------------------------
    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        """This fleet's OpenAPI schema: FastAPI's, with the capabilities the fleet
        serves enumerated (a task for another capability is not valid by the schema)
        and bearer authentication declared."""
        if self._schema is None:
            self._schema = _fleet_schema(
                request.app.routes, sorted(self._caps), request.scope.get("root_path", "")
            )
        return JSONResponse(self._schema)

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="openapi.json", title=f"{API_TITLE} API")

    # -- read ----------------------------------------------------------------------
    @api.get("/tasks", response_model=TaskPage, responses=_guarded())
    async def tasks(
        self,
        request: Request,
        status: Literal["pending", "completed", "failed"] | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
        cursor: Annotated[
            str | None,
            Query(min_length=1, max_length=MAX_CURSOR_CHARS, pattern=r"^[A-Za-z0-9_-]+$"),
        ] = None,
    ) -> Any:
        """The tenant's tasks, a page at a time: pending ones (queued or running) in id
        order, then finished ones newest first; ``status`` lists one kind. Pass
        ``next_cursor`` back as ``cursor`` for the next page (with the same ``status``).
        A task that finishes while you page may be listed twice, never skipped."""
        tenant = _principal(request).tenant
        try:
            at = None if cursor is None else Cursor.decode(cursor, status, self._ledger.n)
        except BadCursor as exc:
            return _bad_cursor(str(exc))
        shards = [sh for per_cap in self._shards.values() for sh in per_cap]
        prefix = _fleet_id(tenant, "")
        page, nxt = await list_tasks(self._ledger, shards, tenant, prefix, status, at, limit)
        tasks = [
            TaskState(id=_client_id(t), status="pending")
            if isinstance(t, str)
            else _state(_client_id(t.task_id), t, self._redact)
            for t in page
        ]
        return TaskPage(tasks=tasks, next_cursor=None if nxt is None else nxt.encode())

    @api.get(
        "/tasks/{task_id}",
        response_model=TaskState,
        responses=_guarded(
            {
                404: {"model": Problem, "description": "no such task for this tenant"},
                429: {"model": Problem, "description": "too many requests or long-polls"},
            }
        ),
    )
    async def task(
        self,
        request: Request,
        task_id: Annotated[str, Path(min_length=1, max_length=128)],
        wait_s: Annotated[float, Query(ge=0, le=300, allow_inf_nan=False)] = 0.0,
    ) -> Any:
        """A task's status: ``pending`` until its outcome is recorded, then its result;
        404 for an id this tenant never submitted (or whose outcome's retention passed).

        ``wait_s``: wait up to that many seconds (at most ``ingress.limits.max_wait_s``)
        for the outcome before answering ``pending``.
        """
        tenant = _principal(request).tenant
        fid = _fleet_id(tenant, task_id)
        wait = min(wait_s, self._limits.max_wait_s)
        if wait <= 0:
            return await self._lookup(task_id, fid)
        if self._long_polls[tenant] >= self._limits.tenant_long_polls:
            return JSONResponse(
                status_code=429,
                content={
                    "detail": f"this tenant already waits on {self._long_polls[tenant]} "
                    "tasks here (ingress.limits.tenant_long_polls)"
                },
                headers={"Retry-After": "1"},
            )
        self._long_polls[tenant] += 1
        try:
            deadline = time.monotonic() + wait
            backoff = backoff_wait(POLL_BACKOFF, None)
            tries = 0
            while True:
                got = await self._lookup(task_id, fid)
                left = deadline - time.monotonic()
                if not isinstance(got, TaskState) or got.status != "pending" or left <= 0:
                    return got
                tries += 1
                await asyncio.sleep(min(left, backoff(attempt_state(tries))))
        finally:
            self._long_polls[tenant] -= 1

    async def _lookup(self, client_id: str, fid: str) -> TaskState | JSONResponse:
        """The ledger's outcome; else pending if a queue shard holds the task; else the
        ledger once more (the outcome may have been recorded and the item acked between
        the two looks); else 404."""
        (outcome,) = await self._ledger.get_async([fid])
        if outcome is not None:
            return _state(client_id, outcome, self._redact)
        if await self._queued(fid):
            return TaskState(id=client_id, status="pending")
        (outcome,) = await self._ledger.get_async([fid])
        if outcome is not None:
            return _state(client_id, outcome, self._redact)
        return _no_such_task()

    async def _queued(self, fid: str) -> bool:
        s = shard_of(fid, self._n_shards)
        found = await asyncio.gather(
            *(shards[s].known.remote([fid]) for shards in self._shards.values())
        )
        return any(f[0] for f in found)

    @api.delete(
        "/tasks/{task_id}",
        response_model=TaskState,
        responses=_guarded(
            {
                404: {"model": Problem, "description": "no such task for this tenant"},
                409: {"model": Problem, "description": "the task is running or finished"},
            }
        ),
    )
    async def cancel(
        self, request: Request, task_id: Annotated[str, Path(min_length=1, max_length=128)]
    ) -> Any:
        """Cancel a task that has not started: its outcome is recorded as failed with
        reason ``cancelled`` before it leaves the queue, and it never runs. A running
        task cannot be cancelled (409); a finished one answers 409 with its result."""
        fid = _fleet_id(_principal(request).tenant, task_id)
        s = shard_of(fid, self._n_shards)
        states = await asyncio.gather(
            *(shards[s].cancel.remote(fid) for shards in self._shards.values())
        )
        if "running" in states:
            return JSONResponse(
                status_code=409,
                content={"detail": "the task is running: it can no longer be cancelled"},
            )
        (outcome,) = await self._ledger.get_async([fid])
        if outcome is None:
            return _no_such_task()
        state = _state(task_id, outcome, self._redact)
        if "cancelled" in states and outcome.reason == "cancelled":
            return state
        return JSONResponse(
            status_code=409,
            content={
                "detail": f"the task already finished ({state.status})",
                "task": state.model_dump(mode="json"),
            },
        )

    @api.get("/status", responses=_guarded())
    async def status(self, request: Request) -> dict[str, Any]:
        """For an ``admin`` key: pools, agents, hosts, in-flight work, queue depth and
        age, ledger count (secrets redacted). For others: the tenant's own pending
        tasks per capability."""
        who = _principal(request)
        if who.may(Role.ADMIN):
            return await asyncio.to_thread(self._fc.status)
        prefix = scoped_id(who.tenant, "")
        pending: dict[str, int] = {}
        for cap, shards in self._shards.items():
            ids = await asyncio.gather(*(sh.pending_ids.remote() for sh in shards))
            pending[cap] = sum(1 for part in ids for i in part if i.startswith(prefix))
        return {"tenant": who.tenant, "pending": pending}

    @api.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses=_guarded(),
    )
    async def metrics(self) -> str:
        """Prometheus metrics: queue depth, age, rates, lease expiries, active alerts."""
        return await asyncio.to_thread(self._fc.metrics_text)

    @api.get(
        "/healthz",
        response_model=Health,
        response_model_exclude_none=True,
        responses={
            503: {
                "model": Health,
                "description": "a control actor is not ALIVE, or the ledger does not answer",
            }
        },
    )
    async def healthz(self) -> Any:
        """200 when every control actor is ALIVE and the ledger answers; 503 naming
        each actor that is not, with its state. Answers within ``HEALTH_TIMEOUT_S``.

        The states come from Ray's GCS, not from the actors: a call to a restarting
        actor waits for its restart (``max_task_retries=-1``), so only the ledger is
        called, and only once it is ALIVE.
        """
        spec = self._fc.spec
        deadline = asyncio.get_running_loop().time() + HEALTH_TIMEOUT_S

        def unhealthy(detail: str, down: dict[str, str] | None = None) -> JSONResponse:
            body = Health(status="unhealthy", fleet=spec.name, detail=detail, not_alive=down)
            return JSONResponse(status_code=503, content=body.model_dump(exclude_none=True))

        try:  # actor_states blocks on the GCS: in a thread, bounded
            states = await asyncio.wait_for(
                asyncio.to_thread(
                    actor_states, spec.namespace, Names(spec.name).control_actors(spec)
                ),
                HEALTH_TIMEOUT_S,
            )
        except Exception as exc:  # any failure to answer is "unhealthy", not a 500
            return unhealthy(f"control actor states unknown: {type(exc).__name__}")
        down = not_alive(states)
        if down:
            return unhealthy(
                "control actor(s) not alive: "
                + ", ".join(f"{name} {state}" for name, state in down.items()),
                down,
            )
        try:
            recorded = await asyncio.wait_for(
                self._ledger.count_async(),
                max(0.1, deadline - asyncio.get_running_loop().time()),
            )
        except Exception as exc:
            return unhealthy(f"ledger did not answer: {type(exc).__name__}")
        return Health(status="ok", fleet=spec.name, recorded=recorded)
