"""An entry point's admission control: ``fleet.policy.admission`` on the controller's
last view, refreshed at most once per control interval.

Every entry point (``FleetClient.submit``, the HTTP ingress, the Kafka intake) holds
one ``AdmissionGate``. It asks the controller for every pool's ``PoolLoad`` when its
view is older than the control interval, handing over the refusals it made since (the
controller counts them as metrics and as demand for the autoscaler): one actor call per
interval per entry point, never one per task (the ingress also sends its last
refusals an interval later when no task follows them; a Python client sends them with
its next submit). The call is not waited for, except for
the very first view (up to ``FIRST_VIEW_TIMEOUT_S``): a controller that restarts
leaves the gate on its last view, which goes stale after the pool's
``admission.stale_after_s`` and then admits everything (the queues' ``max_depth``
still bounds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import ray

from fleet.observability.metrics import TenantLabels
from fleet.policy.admission import Admission, PoolLoad, Verdict
from fleet.runtime.budget_client import tenant_of
from fleet.spec.fleet import FleetSpec
from fleet.task import Item, tenant_of_id

log = logging.getLogger(__name__)

FIRST_VIEW_TIMEOUT_S = 2.0
VIEW_CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Refused:
    """A task admission control did not accept: resubmit it (with the same id) after
    ``retry_after_s``; nothing of it was queued."""

    index: int  # its position in the submitted batch
    id: str
    reason: str  # shed, unavailable, deadline_exceeded
    retry_after_s: float
    predicted_wait_s: float | None  # None: no finite prediction (the pool cannot drain)


class AdmissionGate:
    """``controller``: returns the controller's handle (looked up each time: ``fleet
    apply`` replaces it). ``clock``: Unix seconds."""

    def __init__(
        self,
        spec: FleetSpec,
        controller: Callable[[], Any],
        clock: Callable[[], float] = time.time,
    ):
        self.policy = Admission(clock)
        self._pools = {p.capability: p.name for p in spec.pools}
        self._interval = min(p.autoscaling.control_interval_s for p in spec.pools)
        self._controller = controller
        self._tenants = TenantLabels.of_spec(spec)
        self._ref: Any = None
        self._task: asyncio.Task[None] | None = None
        self._asked = -math.inf  # monotonic time of the last request
        self._has_view = False
        self._id = uuid.uuid4().hex  # this entry point, for its share of admissions
        self._admitted = 0  # tasks admitted since the last report
        self._handle: Any = None  # the controller's, until a call through it fails

    # -- the view -----------------------------------------------------------------
    def _request(self) -> Any:
        counts = [(*key, n) for key, n in self.policy.take_counts().items()]
        admitted, self._admitted = self._admitted, 0
        self._asked = time.monotonic()
        if self._handle is None:  # a GCS lookup: once, and again after a failure
            self._handle = self._controller()
        return self._handle.admission.remote(self._id, admitted, counts)

    def _due(self) -> bool:
        return time.monotonic() - self._asked >= self._interval

    def _take(self, answer: tuple[dict[str, PoolLoad], float]) -> None:
        loads, share = answer
        self.policy.update(loads, share)
        self._has_view = True

    def refresh(self) -> None:
        """Bring the view up to date (from a synchronous caller)."""
        if self._ref is None and self._due():
            try:
                self._ref = self._request()
            except Exception as exc:  # no controller (yet): admit on the last view
                self._handle = None
                log.debug("admission view not requested: %r", exc)
                return
        if self._ref is None:
            return
        ready, _ = ray.wait([self._ref], timeout=0 if self._has_view else FIRST_VIEW_TIMEOUT_S)
        if ready:
            ref, self._ref = self._ref, None
            try:
                self._take(ray.get(ref))
            except Exception as exc:
                self._handle = None  # replaced by `fleet apply`, or gone: look it up again
                log.debug("admission view failed: %r", exc)

    async def refresh_async(self) -> None:
        """Bring the view up to date (from an event loop: the ingress)."""
        if self._task is None and self._due():
            try:
                ref = self._request()
            except Exception as exc:
                log.debug("admission view not requested: %r", exc)
                return
            self._task = asyncio.get_running_loop().create_task(self._fetch(ref))
        if not self._has_view and self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait({self._task}, timeout=FIRST_VIEW_TIMEOUT_S)

    def report_later(self) -> None:
        """From an event loop: make sure refusals not yet reported reach the controller
        within an interval even if no other task arrives (the view's next refresh
        carries them)."""
        if self._task is None and self.policy.shed_counts:
            self._task = asyncio.get_running_loop().create_task(self._refresh_when_due())

    async def _refresh_when_due(self) -> None:
        await asyncio.sleep(max(0.0, self._asked + self._interval - time.monotonic()))
        try:
            ref = self._request()
        except Exception as exc:
            log.debug("admission view not requested: %r", exc)
            self._task = None
            return
        await self._fetch(ref)

    async def _fetch(self, ref: Any) -> None:
        try:
            self._take(await asyncio.wait_for(ref, VIEW_CALL_TIMEOUT_S))
        except Exception as exc:
            self._handle = None  # replaced by `fleet apply`, or gone: look it up again
            log.debug("admission view failed: %r", exc)
        finally:
            self._task = None

    # -- decisions ----------------------------------------------------------------
    def tenant_label(self, item: Item) -> str:
        tenant = tenant_of_id(item.id)
        if tenant is None:
            with contextlib.suppress(orjson.JSONDecodeError):
                tenant = tenant_of(orjson.loads(item.payload))
        return self._tenants(tenant)

    def split(self, items: Sequence[Item]) -> tuple[list[Item], list[Refused]]:
        """(the items to queue, those refused), on the current view (call ``refresh``
        or ``refresh_async`` first)."""
        policy = self.policy
        if not policy.enabled:
            return list(items), []
        admit: list[Item] = []
        refused: list[Refused] = []
        for k, it in enumerate(items):
            v: Verdict = policy.decide(
                self._pools[it.capability],
                it.priority,
                it.deadline_unix_s,
                lambda it=it: self.tenant_label(it),
            )
            if v.admitted:
                admit.append(it)
                self._admitted += 1
            else:
                wait = v.wait_s if math.isfinite(v.wait_s) else None
                refused.append(
                    Refused(k, it.id, v.reason or "shed", round(v.retry_after_s, 3), wait)
                )
        return admit, refused


def retry_after_s(refused: Sequence[Refused]) -> int:
    """``Retry-After`` for a set of refusals: the longest, in whole seconds, >= 1."""
    return max(1, math.ceil(max((r.retry_after_s for r in refused), default=1.0)))
