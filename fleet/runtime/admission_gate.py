"""An entry point's admission control: ``fleet.policy.admission`` on the controller's
last view, refreshed at most once per control interval.

Every entry point (``FleetClient.submit``, the HTTP ingress, the Kafka intake) holds
one ``AdmissionGate``. It asks the controller for every pool's ``PoolLoad`` when its
view is older than the control interval, handing over the refusals it made since (the
controller counts them as metrics and as demand for the autoscaler): one actor call per
interval per entry point, never one per task (the ingress also sends its last
refusals an interval later when no task follows them; a Python client sends them with
its next submit; figures of a request that failed go with the next). The call is not
waited for, except once for the very first view (up to ``FIRST_VIEW_TIMEOUT_S``): a
controller that restarts leaves the gate on its last view, which goes stale after the
pool's ``admission.stale_after_s`` and then admits everything (the queues'
``max_depth`` still bounds them). The loads' times are shifted by the offset between
the controller's clock and this process's, so a skewed clock neither ages views nor
makes them look fresh.

The same view carries each pool's degrade rule (``fleet.policy.degrade``): ``split``
sends a degraded pool's new tasks to its fallback, and, where the rule answers from the
pool's cache (``degrade.from_cache``), ``answer_from_cache`` first answers the tasks
with a ``cache_key`` that has a recent result (one ledger call for the batch, made only
while such a rule holds): each answer is recorded as the new task's own outcome, marked
degraded with the rule, before the caller reports it. Only tasks whose id fleet made up
at this call are answered so (one the client named may be queued already: it takes
the ordinary path, where the queue finds it), and a lookup or record that fails or
takes longer than ``CACHE_LOOKUP_TIMEOUT_S`` answers nothing: the tasks go the
ordinary way. And an entry point whose put a queue
shard answered with tasks over their tenant's bulkhead (``fleet.policy.bulkhead``)
turns them into refusals here (``bulkhead_refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from fleet.observability.metrics import TenantLabels
from fleet.policy.admission import Admission, PoolLoad, Verdict
from fleet.policy.bulkhead import BULKHEAD
from fleet.policy.degrade import DEGRADED, fallback_of
from fleet.spec.fleet import FleetSpec
from fleet.task import (
    Item,
    Outcome,
    cache_key_of,
    is_idempotent_id,
    payload_hash,
    payload_tenant,
    tenant_of_id,
)

log = logging.getLogger(__name__)

FIRST_VIEW_TIMEOUT_S = 2.0
CACHE_LOOKUP_TIMEOUT_S = 1.0  # a degrade rule's cache: asked and answers recorded
VIEW_CALL_TIMEOUT_S = 5.0
# Clocks closer than this are taken as equal (the request's own time is of this order).
CLOCK_SKEW_IGNORED_S = 0.05


@dataclass(frozen=True)
class Refused:
    """A task admission control did not accept: resubmit it (with the same id) after
    ``retry_after_s``; nothing of it was queued."""

    index: int  # its position in the submitted batch
    id: str
    reason: str  # shed, unavailable, deadline_exceeded, bulkhead
    retry_after_s: float
    predicted_wait_s: float | None  # None: no finite prediction (the pool cannot drain)


class AdmissionGate:
    """``controller``: returns the controller's handle (looked up once, and again after
    a call through it failed: ``fleet apply`` replaces it). ``clock``: Unix seconds.

    Thread-safe for synchronous callers (``FleetClient`` may be used from threads);
    the asynchronous path runs on one event loop (the ingress's)."""

    def __init__(
        self,
        spec: FleetSpec,
        controller: Callable[[], Any],
        clock: Callable[[], float] = time.time,
    ):
        self.policy = Admission(clock)
        self._clock = clock
        self._pools = {p.capability: p.name for p in spec.pools}
        self.interval_s = spec.control_interval_s  # between view requests
        self._controller = controller
        self._tenants = TenantLabels.of_spec(spec)
        self._bulkhead_retry_s = spec.bulkheads.retry_after_s
        self._capability = {p.name: p.capability for p in spec.pools}
        self._lock = threading.Lock()
        self._ref: Any = None  # the view request in flight (synchronous path)
        self._task: asyncio.Task[None] | None = None  # ... (asynchronous path)
        self._asked = -math.inf  # monotonic time of the last request
        self._has_view = False
        self._waited_first = False  # a caller already waited for the first view
        self._id = uuid.uuid4().hex  # this entry point, for its share of admissions
        self._admitted: dict[str, int] = {}  # per pool, since the last report
        self._handle: Any = None
        self._sent: tuple[dict[str, int], dict[tuple[str, int, str, str], int]] = ({}, {})

    # -- the view -----------------------------------------------------------------
    def _request(self) -> Any:
        """Send the view request with what was admitted and refused since the last;
        those figures are put back if the request fails (``_failed``)."""
        self._sent = (self._admitted, self.policy.take_counts())
        self._admitted = {}
        self._asked = time.monotonic()
        if self._handle is None:  # a GCS lookup: once, and again after a failure
            self._handle = self._controller()
        counts = [(*key, n) for key, n in self._sent[1].items()]
        return self._handle.admission.remote(self._id, self._sent[0], counts)

    def _send(self) -> Any:
        """``_request``, or None when it could not be sent (no controller yet)."""
        try:
            return self._request()
        except Exception as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: BaseException) -> None:
        """A view request failed: keep its figures for the next, look the controller
        up again (``fleet apply`` replaced it, or it is gone)."""
        admitted, counts = self._sent
        self._sent = ({}, {})
        for pool, n in admitted.items():
            self._admitted[pool] = self._admitted.get(pool, 0) + n
        for key, n in counts.items():
            self.policy.count(*key, n=n)
        self._handle = None
        log.debug("admission view failed: %r", exc)

    def _due(self) -> bool:
        return time.monotonic() - self._asked >= self.interval_s

    def _take(self, answer: tuple[dict[str, PoolLoad], dict[str, float], float]) -> None:
        loads, shares, their_now = answer
        self._sent = ({}, {})
        # The loads' times are the controller's clock: shift them onto ours.
        skew = self._clock() - their_now
        if abs(skew) > CLOCK_SKEW_IGNORED_S:
            loads = {
                p: dataclasses.replace(ld, taken_unix_s=ld.taken_unix_s + skew)
                for p, ld in loads.items()
            }
        self.policy.update(loads, shares)
        self._has_view = True

    def refresh(self) -> None:
        """Bring the view up to date (from a synchronous caller). Only the first view
        is waited for, and only once (up to ``FIRST_VIEW_TIMEOUT_S``)."""
        with self._lock:
            if self._ref is None and self._due():
                self._ref = self._send()  # None: no controller (yet), the last view holds
            ref = self._ref
            if ref is None:
                return
            wait = 0.0
            if not self._has_view and not self._waited_first:
                self._waited_first = True
                wait = FIRST_VIEW_TIMEOUT_S
            ready, _ = ray.wait([ref], timeout=wait)
            if not ready:
                if time.monotonic() - self._asked > VIEW_CALL_TIMEOUT_S:
                    self._ref = None  # never answered: ask again
                    self._failed(TimeoutError("admission view"))
                return
            self._ref = None
            try:
                self._take(ray.get(ref))
            except Exception as exc:
                self._failed(exc)

    async def refresh_async(self) -> None:
        """Bring the view up to date (from an event loop: the ingress)."""
        if self._task is None and self._due():
            ref = self._send()
            if ref is None:
                return
            self._task = asyncio.get_running_loop().create_task(self._fetch(ref))
        if not self._has_view and not self._waited_first and self._task is not None:
            self._waited_first = True
            with contextlib.suppress(Exception):
                await asyncio.wait({self._task}, timeout=FIRST_VIEW_TIMEOUT_S)

    def report_later(self) -> None:
        """From an event loop: make sure refusals not yet reported reach the controller
        within an interval even if no other task arrives (the view's next refresh
        carries them)."""
        if self._task is None and self.policy.shed_counts:
            self._task = asyncio.get_running_loop().create_task(self._refresh_when_due())

    async def _refresh_when_due(self) -> None:
        await asyncio.sleep(max(0.0, self._asked + self.interval_s - time.monotonic()))
        ref = self._send()
        if ref is None:
            self._task = None
            return
        await self._fetch(ref)

    async def _fetch(self, ref: Any) -> None:
        try:
            self._take(await asyncio.wait_for(ref, VIEW_CALL_TIMEOUT_S))
        except Exception as exc:
            self._failed(exc)
        finally:
            self._task = None
        self.report_later()  # refusals made while this request was in flight

    # -- decisions ----------------------------------------------------------------
    def tenant_label(self, item: Item) -> str:
        return self._tenants(tenant_of_id(item.id) or payload_tenant(item.payload))

    def _cache_asks(
        self, items: Sequence[Item], generated: Collection[str]
    ) -> list[tuple[int, Any, str, float]]:
        """(index, cache key, rule, max age) of the items a degrade rule may answer
        from its pool's cache, on the current view: those with a ``cache_key`` whose id
        is in ``generated``."""
        if not self.policy.degrading or not generated:
            return []
        rules = self.policy.cache_rules()
        if not rules:
            return []
        asks = []
        for k, it in enumerate(items):
            if it.cache_key is None or it.id not in generated:
                continue
            pool = self._pools[it.capability]
            if (r := rules.get(pool)) is not None:
                asks.append((k, (pool, cache_key_of(it)), r[0], r[1]))
        return asks

    def _answers(
        self,
        items: Sequence[Item],
        asks: list[tuple[int, Any, str, float]],
        found: Sequence[Outcome | None],
    ) -> dict[str, Outcome]:
        """The new tasks' own outcomes from the cached ones ``found`` (per ask): the
        cached output, no run and no cost of their own, degraded with the rule."""
        now = self._clock()
        out: dict[str, Outcome] = {}
        for (k, _, rule, max_age_s), o in zip(asks, found):
            if o is None or not o.ok or o.finished_unix_s < now - max_age_s:
                continue
            it = items[k]
            out[it.id] = Outcome(
                it.id, True, o.output, None, None, o.agent_id, o.pool, 0,
                it.submitted_unix_s, None, now, 0, 0, 0.0,
                payload_hash(it.payload) if is_idempotent_id(it.id) else None, rule,
            )  # fmt: skip
        return out

    def answer_from_cache(
        self, items: Sequence[Item], ledger: Any, generated: Collection[str]
    ) -> dict[str, Outcome]:
        """Answer what a degrade rule answers from its pool's cache (the module
        docstring): the outcomes recorded, by task id; the caller queues the rest.
        ``generated``: the ids fleet made up for this call."""
        asks = self._cache_asks(items, generated)
        if not asks:
            return {}
        try:
            found = ledger.cached(
                [a[1] for a in asks], max(a[3] for a in asks), CACHE_LOOKUP_TIMEOUT_S
            )
            answers = self._answers(items, asks, found)
            if answers:
                ledger.record(list(answers.values()))
        except Exception as exc:  # a ledger shard slow or restarting: all misses
            log.info("degrade cache not asked: %r", exc)
            return {}
        self._count_answers(items, answers)
        return answers

    async def answer_from_cache_async(
        self, items: Sequence[Item], ledger: Any, generated: Collection[str]
    ) -> dict[str, Outcome]:
        """``answer_from_cache`` for an entry point with an event loop."""
        asks = self._cache_asks(items, generated)
        if not asks:
            return {}
        try:
            async with asyncio.timeout(CACHE_LOOKUP_TIMEOUT_S):
                found = await ledger.cached_async(
                    [a[1] for a in asks], max(a[3] for a in asks)
                )
                answers = self._answers(items, asks, found)
                if answers:
                    await ledger.record_async(list(answers.values()))
        except Exception as exc:  # a ledger shard slow or restarting: all misses
            log.info("degrade cache not asked: %r", exc)
            return {}
        self._count_answers(items, answers)
        return answers

    def _count_answers(self, items: Sequence[Item], answers: Mapping[str, Outcome]) -> None:
        """Count the tasks answered from a cache as degraded, for the pool each was for."""
        for it in items:
            if it.id in answers:
                pool = self._pools[it.capability]
                self.policy.count(pool, it.priority, DEGRADED, self.tenant_label(it))

    def split(
        self, items: Sequence[Item], count: bool = True
    ) -> tuple[list[Item], list[Refused]]:
        """(the items to queue, those refused, each with its index in ``items``), on
        the current view (call ``refresh`` or ``refresh_async`` first). ``count=False``:
        the refusals are not counted (the caller counts what it holds back with
        ``count_refusal``).

        A task for a pool a degrade rule holds (``pools[].degrade``) is sent to its
        fallback: the item returned has the fallback pool's capability and the rule in
        ``degraded``, and admission control decides it for the fallback; it is counted
        as degraded (reason ``degraded``) for the pool it was meant for."""
        policy = self.policy
        degraded: dict[str, str] = {}
        to_pool: dict[str, str] = {}
        if policy.degrading:  # the rules and fallbacks the controller publishes
            for pool, (rule, fallback) in policy.degraded().items():
                if fallback in self._capability:  # a pool this entry point knows
                    degraded[pool], to_pool[pool] = rule, fallback
        if not policy.enabled and not degraded:
            return list(items), []
        admit: list[Item] = []
        refused: list[Refused] = []
        admitted = self._admitted
        for k, it in enumerate(items):
            pool = self._pools[it.capability]
            meant = None
            if degraded and pool in degraded:
                to, rule = fallback_of(pool, degraded, to_pool)
                if rule is not None:
                    meant = pool
                    it = it._replace(capability=self._capability[to], degraded=rule)
                    pool = to
            v: Verdict = policy.decide(
                pool,
                it.priority,
                it.deadline_unix_s,
                lambda it=it: self.tenant_label(it),
                count,
            )
            if v.admitted:
                admit.append(it)
                admitted[pool] = admitted.get(pool, 0) + 1
                if meant is not None:  # counted once, when it is queued for the fallback
                    policy.count(meant, it.priority, DEGRADED, self.tenant_label(it))
            else:
                wait = v.wait_s if math.isfinite(v.wait_s) else None
                refused.append(
                    Refused(k, it.id, v.reason or "shed", round(v.retry_after_s, 3), wait)
                )
        return admit, refused

    def bulkhead_refused(
        self, items: Sequence[Item], index: Mapping[str, int], count: bool = True
    ) -> list[Refused]:
        """Items ``split`` admitted that a queue shard then refused at their tenant's
        queued bulkhead (``bulkheads``), as refusals (reason ``bulkhead``, retry after
        ``bulkheads.retry_after_s``; ``index``: each id's position in the caller's
        batch). Their admissions are taken back (a tenant's flood must not make the
        pool look busier to everyone else's tasks), and with ``count`` they are
        counted for the controller."""
        out = []
        for it in items:
            pool = self._pools[it.capability]
            if self._admitted.get(pool, 0) > 0:
                self._admitted[pool] -= 1
            self.policy.withdraw(pool, it.priority)
            if count:
                self.policy.count(pool, it.priority, BULKHEAD, self.tenant_label(it))
            out.append(Refused(index[it.id], it.id, BULKHEAD, self._bulkhead_retry_s, None))
        return out

    def count_refusal(self, item: Item, reason: str) -> None:
        """Count one refusal of ``item`` (with ``split(count=False)``)."""
        pool = self._pools[item.capability]
        self.policy.count(pool, item.priority, reason, self.tenant_label(item))


def retry_after_s(refused: Sequence[Refused]) -> int:
    """``Retry-After`` for a set of refusals: the longest, in whole seconds, >= 1."""
    return max(1, math.ceil(max((r.retry_after_s for r in refused), default=1.0)))
