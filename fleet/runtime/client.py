"""FleetClient: the driver-side API. Start or join a fleet, submit, wait, read results."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from fleet.ledger.store import SINCE_LIMIT
from fleet.observability.logs import ray_job_config
from fleet.policy.admission import DEADLINE_EXCEEDED
from fleet.policy.throttle import ClientThrottle
from fleet.runtime.admission_gate import AdmissionGate, Refused, retry_after_s
from fleet.runtime.enqueue import QueueFullError as QueueFullError  # submit raises it
from fleet.runtime.enqueue import put_items
from fleet.runtime.ledger import LedgerClient
from fleet.runtime.names import Names
from fleet.security.keys import check_tenant
from fleet.security.redact import redactor_for
from fleet.spec.fleet import FleetSpec
from fleet.spec.observability import LogFormat
from fleet.task import (
    IdempotencyConflict,
    Item,
    Outcome,
    Result,
    Task,
    TaskRejected,
    id_is_generated,
    split_known,
    to_item,
)

WAIT_POLL_S = 0.2
CONNECT_TIMEOUT_S = 60.0  # a restarting controller answers well within it
IDEMPOTENCY_CONFLICT = "idempotency_conflict"  # a refusal found to conflict on retry
SPEC_ASK_TIMEOUT_S = 10.0  # at shutdown: past it, tear down by this client's own spec
# Ray's own INFO lines ("Connecting to existing Ray cluster...") stay out of the CLI's
# stderr, where an error is one line; Ray's warnings still show.
RAY_DRIVER_LOG_LEVEL = logging.WARNING
REACH_TIMEOUT_S = 5.0  # how long the TCP probe of a cluster's address may take
RAY_CLIENT_PORT = 10001  # ray://host without a port


def init_ray(
    address: str | None,
    num_cpus: int | None = None,
    dashboard: bool = True,
    log_format: LogFormat | str = LogFormat.TEXT,
) -> bool:
    """Join ``address`` or start a local cluster bound to loopback. True if we started it.

    The local cluster runs Ray's dashboard on 127.0.0.1 (``dashboard=False``: none);
    ``dashboard_url()`` tells where, for a joined cluster too. Ray's metrics agents
    export fleet's metrics either way (``fleet.observability.metrics``).

    Without ``address``, ``RAY_ADDRESS`` names the cluster to join when it is set (as
    under ``ray job submit``, or after ``ray start --head``): Ray's own rule, so nothing
    of Ray's is patched then. Ray's token authentication is left at Ray's default;
    fleet never turns it off.

    ``log_format`` (the spec's ``observability.log_format``): ``json`` has every worker
    of this job (the fleet's actors and hosts it starts) log in Ray's JSON encoding
    (``fleet.observability.logs.ray_job_config``); the driver's own logging is left as
    it is. Workers' output stays in their log files (``log_to_driver=False``):
    forwarded, every actor's lines would interleave on the CLI's stderr.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    job_config = ray_job_config(log_format)
    if address:
        _check_reachable(address)
        ctx = ray.init(
            address=address,
            namespace="fleet",
            log_to_driver=False,
            logging_level=RAY_DRIVER_LOG_LEVEL,
            job_config=job_config,
        )
        _remember_dashboard(ctx)
        return False
    loopback_only()
    ctx = ray.init(
        # "local": a new cluster, even when `ray start` left one registered here
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        namespace="fleet",
        logging_level=RAY_DRIVER_LOG_LEVEL,
        job_config=job_config,
    )
    _remember_dashboard(ctx)
    return True


_dashboard: list[str] = []


def _remember_dashboard(ctx: Any) -> None:
    _dashboard.clear()
    url = getattr(ctx, "dashboard_url", None)
    if url:
        _dashboard.append(url if "://" in url else f"http://{url}")


def dashboard_url() -> str | None:
    """The Ray dashboard of the cluster ``init_ray`` started or joined (None: it runs
    none)."""
    return _dashboard[0] if _dashboard else None


def _check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise ConnectionError naming ``address`` unless its port accepts a TCP connection.

    With nothing listening, Ray 2.60's ``ray.init(address=host:port)`` does not fail: it
    logs "Failed to connect to GCS" and retries for minutes (and has no timeout to pass).
    One TCP connect to the port Ray would dial fails within ``timeout_s`` instead (at
    once when the port is closed). The address is resolved as ``ray.init`` resolves it
    (Ray's ``canonicalize_bootstrap_address``): ``auto`` via ``RAY_ADDRESS`` or the local
    clusters, and 127.0.0.1/localhost replaced by this node's IP unless ``loopback_only``
    is in effect; ``auto`` finding no cluster raises Ray's own ConnectionError. A
    ``ray://`` address is the Ray Client server's, dialled as given.
    """
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        target: str | None = address.removeprefix("ray://").split("/")[0]
        if target and ":" not in target.rsplit("]", 1)[-1]:
            target = f"{target}:{RAY_CLIENT_PORT}"
    else:
        try:
            target = canonicalize_bootstrap_address(address)
        except ConnectionError as exc:  # "auto" and no cluster found
            raise ConnectionError(
                f"no Ray cluster found for address {address!r}: {exc}"
            ) from None
    if target is None:  # "local": ray.init starts a cluster
        return
    shown = address if target == address else f"{address} (dialled as {target})"
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConnectionError(f"cannot reach the Ray cluster at {shown}: {why}") from None


def loopback_only() -> None:
    """Make a local cluster started from this process use 127.0.0.1 as its node IP.

    Ray replaces 127.0.0.1 given as ``_node_ip_address`` with the machine's external
    address, and then binds its servers to it or to every interface. Ray's
    single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS
    and Windows) uses loopback instead. Ray reads the variable at import, so it is set
    both for the processes this one starts and in the already-imported constant.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@dataclass
class SubmitReport:
    """What ``submit`` did: ``accepted`` ids (queued, or already recorded), ``rejected``
    inputs with the reason, ``existing``: the recorded result of each accepted id that
    already had one (within ``results.retention_s``), which was not run again; and
    ``refused``: tasks admission control did not accept (``fleet.policy.admission``),
    each with its input index, id, reason and ``retry_after_s``. Nothing of a refused
    task was queued: resubmit it with the same id (``Task.id`` of the refusal)."""

    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (input index, reason)
    existing: dict[str, Result] = field(default_factory=dict)
    generated: set[str] = field(default_factory=set)  # ids fleet made up (see validate)
    refused: list[Refused] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # each valid item's input index

    @property
    def retry_after_s(self) -> int | None:
        """When to resubmit the refused tasks (whole seconds), None if none was."""
        return retry_after_s(self.refused) if self.refused else None


class FleetClient:
    """A handle on a running fleet (its actors are found by name)."""

    def __init__(self, spec: FleetSpec, owned: list[Any] | None = None):
        self.spec = spec
        self._owned = owned or []  # handles that keep a non-detached fleet alive
        self.names = Names(spec.name)
        ns = spec.namespace
        self.ledger = LedgerClient.for_spec(spec)
        ray.get_actor(self.names.controller, namespace=ns)  # the fleet runs: fail early
        self._shards = {
            cap: [
                ray.get_actor(self.names.shard(cap, i), namespace=ns)
                for i in range(spec.queues.shards)
            ]
            for cap in spec.capabilities
        }
        self._caps = frozenset(spec.capabilities)
        self.admission = AdmissionGate(spec, self._ctl)

    # -- lifecycle -----------------------------------------------------------------
    @classmethod
    def start(
        cls, spec: FleetSpec, *, detached: bool = False, http: bool = False
    ) -> FleetClient:
        from fleet.runtime.deploy import deploy

        return cls(spec, deploy(spec, detached=detached, http=http))

    @classmethod
    def connect(cls, name: str = "fleet", namespace: str = "fleet") -> FleetClient:
        """Attach to a fleet already running on the connected cluster."""
        try:
            ctl = ray.get_actor(Names(name).controller, namespace=namespace)
        except ValueError:
            raise LookupError(
                f"no fleet named {name!r} in namespace {namespace!r} on this cluster "
                "(start one with `fleet run SPEC.yaml`)"
            ) from None
        # Bounded: a controller that does not answer is an error to report (the CLI's
        # exit 3), not a hang.
        status = ray.get(ctl.status.remote(), timeout=CONNECT_TIMEOUT_S)
        return cls(FleetSpec.model_validate(status["spec"]))

    def _ctl(self) -> Any:
        """The controller, looked up by name each time: ``fleet apply`` replaces it
        with another actor of the same name."""
        return ray.get_actor(self.names.controller, namespace=self.spec.namespace)

    def current_spec(self) -> FleetSpec:
        """The spec the fleet runs now (``fleet apply`` may have changed it since this
        client was made); this client's own if the controller does not answer."""
        try:
            status = ray.get(self._ctl().status.remote(), timeout=SPEC_ASK_TIMEOUT_S)
            return FleetSpec.model_validate(status["spec"])
        except Exception:
            return self.spec

    def shutdown(self) -> None:
        from fleet.runtime.deploy import teardown

        # What runs now: pools that `fleet apply` added are torn down too.
        teardown(self.current_spec())
        self._owned.clear()

    # -- submit --------------------------------------------------------------------
    def validate(
        self, tasks: Iterable[Task | dict[str, Any]], tenant: str | None = None
    ) -> tuple[list[Item], SubmitReport]:
        """Validate and encode tasks; ``report.generated`` holds the ids fleet made up
        here (tasks with neither an id nor an idempotency key): no outcome can exist
        for them, so submitting them needs no ledger lookup. With ``tenant`` the tasks
        are that tenant's, as if its key had sent them to the HTTP ingress: their ids
        are scoped (``@<tenant>:<id>``, what ``report.accepted`` holds) and its
        bulkheads and budgets apply."""
        if tenant is not None:
            check_tenant(tenant)
        items, report = [], SubmitReport()
        limit = self.spec.queues.max_payload_bytes
        for k, t in enumerate(tasks):
            try:
                it = to_item(t, self._caps, limit, tenant=tenant)
            except TaskRejected as exc:
                report.rejected.append((k, str(exc)))
                continue
            items.append(it)
            report.positions.append(k)
            if id_is_generated(t):
                report.generated.add(it.id)
        return items, report

    def submit(
        self,
        tasks: Iterable[Task | dict[str, Any]],
        timeout_s: float | None = None,
        tenant: str | None = None,
    ) -> SubmitReport:
        """Validate and enqueue tasks. Invalid ones are reported, never silently dropped.

        A task whose id (or ``idempotency_key``) already has a recorded outcome is not
        run again: it is accepted and its result is in ``report.existing``. The same
        idempotency key with another payload raises IdempotencyConflict naming the key,
        and nothing of the call is queued. A pool with admission control
        (``pools[].admission``) refuses what would wait too long: those tasks are in
        ``report.refused``, not queued, and so are those over their tenant's
        ``bulkheads`` (reason ``bulkhead``). A full queue makes this wait up to
        ``timeout_s`` (default: the spec's ``submit_timeout_s``), then raise
        QueueFullError naming what was accepted. ``tenant``: see ``validate``.
        """
        items, report = self.validate(tasks, tenant)
        return self.submit_validated(items, report, timeout_s)

    def submit_validated(
        self, items: list[Item], report: SubmitReport, timeout_s: float | None = None
    ) -> SubmitReport:
        """``submit`` for what ``validate`` returned (``fleet submit`` validates first,
        to report invalid lines before anything is queued); fills in ``report``."""
        timeout = self.spec.queues.submit_timeout_s if timeout_s is None else timeout_s
        # The ledger first: a task with an outcome is answered with it, never refused.
        fresh, existing = self._known(items, report.generated)
        self.admission.refresh()  # one view for the cache and admission control
        # A degrade rule answering from its pool's cache answers what it can first.
        if cached := self.admission.answer_from_cache(fresh, self.ledger, report.generated):
            existing.update(cached)
            fresh = [it for it in fresh if it.id not in cached]
        admitted, refused = self.admission.split(fresh)
        at = [k for k, it in enumerate(items) if it.id not in existing]  # fresh's places
        out = {at[r.index] for r in refused}
        # Filled in before anything is queued: if the queue stays full (QueueFullError),
        # the report still says what admission control refused.
        report.refused = [
            dataclasses.replace(r, index=report.positions[at[r.index]]) for r in refused
        ]
        report.accepted = [it.id for k, it in enumerate(items) if k not in out]
        report.existing = {i: o.to_result() for i, o in existing.items()}
        walled = put_items(self._shards, admitted, timeout)
        if walled:  # over their tenant's bulkhead: refused, nothing of them queued
            at_id = {it.id: report.positions[k] for k, it in enumerate(items)}
            more = self.admission.bulkhead_refused(walled, at_id)
            report.refused = sorted(report.refused + more, key=lambda r: r.index)
            out = {r.id for r in more}
            report.accepted = [i for i in report.accepted if i not in out]
        return report

    def submit_until_accepted(
        self,
        tasks: Iterable[Task | dict[str, Any]],
        within_s: float,
        timeout_s: float | None = None,
        tenant: str | None = None,
    ) -> SubmitReport:
        """``submit``, then resubmit what admission control refused, after its
        ``Retry-After`` and throttled by ``ClientThrottle`` (the share held back grows
        with the share refused), until ``within_s`` has passed. ``report.refused``
        holds what is still not accepted, with ids: resubmitting them cannot duplicate
        work (an id is queued once and recorded once)."""
        items, report = self.validate(tasks, tenant)
        return self.retry_refused(
            items, self.submit_validated(items, report, timeout_s), within_s, timeout_s
        )

    def retry_refused(
        self,
        items: list[Item],
        report: SubmitReport,
        within_s: float,
        timeout_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> SubmitReport:
        """Resubmit ``report.refused`` (from ``submit_validated(items, report)``) as
        ``submit_until_accepted`` does. A task refused for its deadline is not retried;
        one whose idempotency key turns out to be taken with another payload stays
        refused with reason ``idempotency_conflict``."""
        throttle = ClientThrottle(time.time)
        throttle.record(len(items), len(items) - len(report.refused))
        by_id = {it.id: it for it in items}
        end = time.monotonic() + within_s
        final = [r for r in report.refused if r.reason == DEADLINE_EXCEEDED]
        waiting = [r for r in report.refused if r.reason != DEADLINE_EXCEEDED]
        while waiting and (left := end - time.monotonic()) > 0:
            sleep(min(retry_after_s(waiting), left))
            n = throttle.allowed(len(waiting))
            send, waiting = waiting[:n], waiting[n:]
            again = SubmitReport(generated=report.generated, positions=[r.index for r in send])
            try:
                self.submit_validated([by_id[r.id] for r in send], again, timeout_s)
            except IdempotencyConflict as exc:  # nothing of this round was queued
                bad = set(exc.ids)
                final += [
                    dataclasses.replace(r, reason=IDEMPOTENCY_CONFLICT, retry_after_s=0.0)
                    for r in send
                    if r.id in bad
                ]
                waiting = [r for r in send if r.id not in bad] + waiting
                continue
            throttle.record(len(send), len(send) - len(again.refused))
            report.existing.update(again.existing)
            final += [r for r in again.refused if r.reason == DEADLINE_EXCEEDED]
            waiting = [r for r in again.refused if r.reason != DEADLINE_EXCEEDED] + waiting
        report.refused = sorted(final + waiting, key=lambda r: r.index)
        out = {r.id for r in report.refused}
        report.accepted = [it.id for it in items if it.id not in out]
        return report

    def admit(self, items: list[Item]) -> tuple[list[Item], list[Refused]]:
        """Admission control on the controller's last view of the pools: (the items to
        queue, those refused); see ``fleet.runtime.admission_gate``."""
        self.admission.refresh()
        return self.admission.split(items)

    def _known(
        self, items: list[Item], generated: Collection[str]
    ) -> tuple[list[Item], dict[str, Outcome]]:
        """(items with no outcome yet, outcomes of those that have one); raises
        IdempotencyConflict for a key used with another payload."""
        ask = [it.id for it in items if it.id not in generated]
        fresh, existing, conflicts = split_known(items, dict(zip(ask, self.ledger.get(ask))))
        if conflicts:
            raise IdempotencyConflict(conflicts)
        return fresh, existing

    def submit_items(
        self,
        items: list[Item],
        timeout_s: float | None = None,
        *,
        generated: Collection[str] = (),
    ) -> dict[str, Outcome]:
        """Queue validated items, but none whose id already has an outcome; returns
        those outcomes by id. Raises IdempotencyConflict (queueing nothing) for an
        idempotency key used with another payload. Ids in ``generated`` (made up by
        ``validate``) are not looked up. No admission control: this is the path of
        work already admitted (benchmarks preloading a queue, chaos replays); callers
        that take new work use ``submit`` or ``submit_validated``."""
        timeout = self.spec.queues.submit_timeout_s if timeout_s is None else timeout_s
        fresh, existing = self._known(items, generated)
        walled = put_items(self._shards, fresh, timeout)
        if walled:
            raise QueueFullError(
                f"{len(walled)} task(s) not accepted: their tenant holds its queued "
                "bulkhead (bulkheads.tenant.max_queued), e.g. "
                + ", ".join(it.id for it in walled[:5])
            )
        return existing

    # -- results -------------------------------------------------------------------
    def wait(
        self,
        ids: list[str],
        timeout_s: float = 600.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Block until every id has an outcome or the timeout passes; returns the missing.

        One lookup of all ids, then only what the ledger recorded since (its cursors):
        the cost of a poll follows what was recorded, not how many ids are awaited. A
        ledger shard that restarts makes a poll wait for it, never raise.
        """
        deadline = time.monotonic() + timeout_s
        cursors = self.ledger.cursors()  # before the lookup: nothing recorded is missed
        missing = set(self.ledger.missing(ids))
        while True:
            if progress:
                progress(len(ids) - len(missing), len(ids))
            if not missing or time.monotonic() >= deadline:
                break
            new, cursors = self.ledger.since(cursors)
            missing.difference_update(new)
            if len(new) < SINCE_LIMIT:  # caught up: poll again later, not in a loop
                time.sleep(WAIT_POLL_S)
        return [i for i in ids if i in missing]

    def results(self, ids: list[str]) -> list[Result | None]:
        return [o.to_result() if o is not None else None for o in self.ledger.get(ids)]

    def summary(self, ids: list[str] | None = None) -> dict[str, Any]:
        return self.ledger.summary(ids)

    def timeline(self, since_t_s: float = 0.0) -> list[dict[str, Any]]:
        return ray.get(self._ctl().timeline.remote(since_t_s))

    #: How long ``status()`` waits for any one actor's answer.
    STATUS_CALL_TIMEOUT_S = 10.0

    def status(self) -> dict[str, Any]:
        """Pools, queues, ledger, alerts, health, budgets, Kafka intake and the control
        plane (``control``: each control actor's state and restart count). Secrets
        (``fleet.security.redact``) are redacted.

        An actor that is not ALIVE (restarting, say) is not called, since a call would
        wait for its restart: its part is left out or empty, and ``unavailable`` says
        why, as does an actor that did not answer within ``STATUS_CALL_TIMEOUT_S``.
        """
        control = self.control_status()
        unavailable: dict[str, str] = {}

        def ask(name: str, call: Callable[[], Any], default: Any) -> Any:
            st = control.get(name, {}).get("state")
            if st not in (None, "ALIVE"):  # None: the states could not be read
                unavailable[name] = st
                return default
            try:
                return ray.get(call(), timeout=self.STATUS_CALL_TIMEOUT_S)
            except (ValueError, ray.exceptions.RayError) as exc:
                unavailable[name] = type(exc).__name__
                return default

        ns = self.spec.namespace
        ctl = ask(self.names.controller, self._ctl().status.remote, {})
        queues = {
            cap: [
                st
                for i, s in enumerate(shards)
                if (st := ask(self.names.shard(cap, i), s.stats.remote, None)) is not None
            ]
            for cap, shards in self._shards.items()
        }
        dispatcher = ask(
            self.names.dispatcher,
            lambda: ray.get_actor(self.names.dispatcher, namespace=ns).stats.remote(),
            {},
        )
        counts = [
            ask(
                self.names.ledger_shard(k),
                lambda k=k: self.ledger.handle(k).count.remote(),
                None,
            )
            for k in range(self.ledger.n)
        ]
        # Failure texts may quote what an agent was given: secrets are redacted.
        return redactor_for(self.spec).data(
            {
                "fleet": self.spec.name,
                "pools": {
                    p.name: {
                        **ctl.get("pools", {}).get(p.name, {}),
                        **dispatcher.get(p.name, {}),
                        "queue": self._queue_summary(queues[p.capability]),
                    }
                    for p in self.spec.pools
                },
                "ledger": {"recorded": None if None in counts else sum(counts)},
                "queues": ctl.get("queues", {}),
                "alerts": ctl.get("alerts", {"active": [], "events": []}),
                "health": ctl.get("health", {}),
                **({"budgets": ctl["budgets"]} if "budgets" in ctl else {}),
                "kafka": self._kafka_status(),
                "control": control,
                **({"unavailable": unavailable} if unavailable else {}),
            }
        )

    def control_status(self) -> dict[str, dict[str, Any]]:
        """Each control actor's state (ALIVE, RESTARTING, DEAD, MISSING, ...) and restart
        count, from Ray's GCS (no actor is called); empty if the GCS did not answer."""
        from fleet.runtime.lifecycle import actor_states

        try:
            return actor_states(self.spec.namespace, self.names.control_actors(self.spec))
        except Exception:  # the status of the rest is still worth showing
            return {}

    @staticmethod
    def _queue_summary(stats: list[dict[str, Any]]) -> dict[str, Any]:
        """One capability's queue, summed over the shards that answered (with
        ``bulkhead`` when its shards count tasks per tenant: ``bulkheads``)."""
        out: dict[str, Any] = {
            "depth": sum(s["depth"] for s in stats),
            "leased": sum(s["leased"] for s in stats),
            "oldest_age_s": max((s["oldest_age_s"] for s in stats), default=0.0),
            "redelivered_total": sum(s["redelivered_total"] for s in stats),
        }
        keys = ("pending_by_tenant", "bulkhead_refused_by_tenant")
        if any(s.get(k) for s in stats for k in keys):

            def total(key: str) -> dict[str, int]:
                return dict(sum((Counter(s.get(key, {})) for s in stats), Counter()))

            out["bulkhead"] = {
                "refused": total("bulkhead_refused_by_tenant"),
                "held_back": sum(s.get("parked", 0) for s in stats),
                "queued": total("pending_by_tenant"),
                "in_flight": total("leased_by_tenant"),
            }
        return out

    def _kafka_status(self) -> list[dict[str, Any]]:
        """Each Kafka intake consumer's counters (a dead one reported as such)."""
        kafka = self.spec.queues.kafka
        out: list[dict[str, Any]] = []
        for i in range(kafka.consumers if kafka else 0):
            try:
                actor = ray.get_actor(
                    self.names.kafka_intake(i), namespace=self.spec.namespace
                )
                out.append(ray.get(actor.stats.remote(), timeout=10))
            except (ValueError, ray.exceptions.RayError) as exc:
                out.append({"consumer": i, "running": False, "error": f"{type(exc).__name__}"})
        return out

    def metrics_text(self) -> str:
        """Prometheus text exposition of the fleet's metrics (queues, pools, agent health)."""
        return ray.get(self._ctl().metrics_text.remote())
