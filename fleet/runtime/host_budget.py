"""An ``AgentHost``'s budget gate: an agent slot and a budget reservation per task.

Only when the fleet has a budget actor. A task holding an agent's slot reserves its
estimate before it runs and settles its actual cost after, through a ``BudgetClient``
that batches the calls (``fleet.runtime.budget_client``). Refused by the agent's own
budget: the agent is parked (``HostCore.park``) and the task tries another agent here;
when every agent here is parked, the task goes back to the queue (``BUDGET_REQUEUE``)
for another host or for later. Refused by a shared budget (fleet, pool, tenant): no
agent may run it, the task fails with ``budget_exhausted``.

Refusals are logged on ``fleet.control``: a shared budget's at WARNING (the task fails),
an agent parked or a task sent back to the queue at INFO, the budget actor unreachable
at WARNING.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from fleet.observability.logs import CONTROL_LOG, log_event
from fleet.policy.host import HostCore
from fleet.policy.routing import RoutingHint
from fleet.runtime.budget_client import BudgetClient, Grant
from fleet.runtime.host_outcomes import MAX_ERROR_CHARS
from fleet.runtime.host_slots import SlotFutures
from fleet.task import Item, Outcome, Task, failed_outcome, tenant_of, tenant_of_id

BUDGET_REQUEUE = "budget_requeue"  # internal: every agent here is parked, requeue
REASON_BUDGET_EXHAUSTED = "budget_exhausted"


class _AllParked(Exception):
    """Every agent of the host is parked: its own budget is short."""


class BudgetGate:
    """Slots with reservations for one host: ``acquire`` before a task runs, ``settle``
    after. ``client`` None: the fleet has no budgets and the host never calls the gate."""

    def __init__(
        self,
        core: HostCore,
        slots: SlotFutures,
        pool: str,
        host_id: str,
        client: BudgetClient | None = None,
    ):
        self.core = core
        self.slots = slots
        self.pool = pool
        self.host_id = host_id
        self.client = client
        self._requeue_after: dict[str, float] = {}  # item id -> delay before redelivery

    async def acquire(
        self, item: Item, task: Task | None, hint: RoutingHint | None
    ) -> tuple[int, Grant] | Outcome:
        """An agent slot and a budget reservation for the task, or its outcome.

        Granted: (agent, grant). Refused by the agent's own budget: the agent is parked
        and the task tries another agent here; when every agent here is parked, the task
        goes back to the queue (``BUDGET_REQUEUE``; see ``requeue_delay``).
        Refused by a shared budget (fleet, pool, tenant): no agent may run it, the task
        fails with ``budget_exhausted``. The slot is released on every path but a grant.
        """
        assert self.client is not None
        core = self.core
        # The ingress's tenant (from the caller's key) when the id is scoped; else the
        # payload's, from a trusted in-cluster client.
        tenant = tenant_of_id(item.id) or tenant_of(
            task.payload if task is not None else orjson.loads(item.payload)
        )
        while True:
            try:
                if core.all_parked():
                    raise _AllParked
                i = await self.slots.acquire(hint)
            except _AllParked:  # every agent here is out of its own budget
                self._requeue_after.setdefault(item.id, core.parking.retry_after_s)
                log_event(  # one per task: DEBUG (the park itself is logged at INFO)
                    CONTROL_LOG,
                    logging.DEBUG,
                    "budget_requeue",
                    task_id=item.id,
                    pool=self.pool,
                    host_id=self.host_id,
                )
                return failed_outcome(
                    item,
                    BUDGET_REQUEUE,
                    f"every agent on host {self.host_id} is out of its own budget",
                    self.pool,
                )
            agent_id = core.agents[i].id
            try:
                g = await self.client.reserve(agent_id, self.pool, tenant)
            except BaseException as exc:
                self.slots.hand(core.release(i))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # The budget actor is unavailable: fail retryably, nothing runs unbooked.
                log_event(
                    CONTROL_LOG,
                    logging.WARNING,
                    "budget_unavailable",
                    task_id=item.id,
                    pool=self.pool,
                    agent_id=agent_id,
                    error=repr(exc),
                )
                return failed_outcome(
                    item, "error", repr(exc)[:MAX_ERROR_CHARS], self.pool, agent_id
                )
            if g.reservation_id is not None:
                return i, g
            if not g.retry_elsewhere:
                self.slots.hand(core.release(i))
                log_event(
                    CONTROL_LOG,
                    logging.WARNING,
                    "budget_refused",
                    task_id=item.id,
                    pool=self.pool,
                    agent_id=agent_id,
                    tenant=tenant,
                    scope=g.scope,
                    detail=g.detail,
                )
                return failed_outcome(
                    item, REASON_BUDGET_EXHAUSTED, g.detail, self.pool, agent_id
                )
            after_s, evicted = core.park(i, g.retry_after_s)
            log_event(
                CONTROL_LOG,
                logging.INFO,
                "agent_parked",
                task_id=item.id,
                pool=self.pool,
                agent_id=agent_id,
                parked_s=after_s,
                scope=g.scope,
                detail=g.detail,
            )
            asyncio.get_running_loop().call_later(after_s, self._unpark, i)
            for fut in evicted:  # tasks waiting for a slot here: none will come
                if not fut.done():
                    fut.set_exception(_AllParked())

    def requeue_delay(self, item: Item) -> float | None:
        """How long a task refused with ``BUDGET_REQUEUE`` waits in the queue before
        its next delivery; None on its last one (it fails with ``budget_exhausted``)."""
        return self.core.requeue_delay(item.deliveries, self._requeue_after.pop(item.id, None))

    def _unpark(self, i: int) -> None:
        self.slots.hand(self.core.unpark(i))

    def settle(self, grant: Grant, spent: tuple[float, int] | None, cpu_s: float) -> None:
        """Queue the settlement (sent with the batch). ``cpu_s``: the CPU seconds its
        agent spent on it (``fleet.runtime.cpu_meter``), charged whatever its end. A
        completed task is charged its actual cost (``spent``: USD, tokens); any other
        its estimate: it may have spent before failing or being preempted, and its
        agent reports tokens only in its reply."""
        assert self.client is not None
        if spent is None:
            self.client.settle_at_estimate(grant, cpu_s=cpu_s)
        else:
            self.client.settle(grant, spent[0], spent[1], cpu_s)
