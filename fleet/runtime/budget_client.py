"""The host's side of the budget actor: reservations and settlements, batched.

A host with budgets asks the budget actor (``fleet.runtime.budget_actor``) before each
task runs and tells it what the task cost after. It never makes one actor call per
task: ``reserve`` queues the request and at most one ``reserve_batch`` call per host is
in flight; every request made while it is in flight goes in the next call (the tasks of
a batch that get an agent at once share one call). ``settle`` and ``release`` only
queue; ``flush`` sends them in one ``settle_batch`` call, once per batch.

Plain data on the wire: a request is ``(agent_id, pool, tenant)``, a grant a ``Grant``.
Ray-free, so a host test can use an in-process backend.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple


class Grant(NamedTuple):
    """The answer to one reservation request.

    Granted: ``reservation_id`` is set and ``estimate_usd`` is what is held. Refused:
    ``reservation_id`` is None, ``scope``/``detail`` name the budget that refused, and
    ``retry_elsewhere`` says only the agent's own budget was short (another agent may
    take the task); ``retry_after_s`` is when the refusing budget may have room again.
    """

    reservation_id: str | None
    estimate_usd: float = 0.0
    estimate_tokens: int = 0
    estimate_cpu_s: float = 0.0
    scope: str = ""
    detail: str = ""
    retry_elsewhere: bool = False
    retry_after_s: float = 0.0


class Settle(NamedTuple):
    """What a reserved task actually used; ``usd`` None releases the reservation (the
    task never ran)."""

    reservation_id: str
    usd: float | None
    tokens: int = 0
    cpu_s: float = 0.0


class BudgetClient:
    """Batches one host's calls to the budget actor (see the module docstring).

    ``actor`` is the budget actor's handle, or anything with ``reserve_batch.remote``
    and ``settle_batch.remote`` returning awaitables; ``ref`` (name, namespace) looks
    the actor up on first use instead.
    """

    def __init__(self, ref: tuple[str, str] | None = None, actor: Any = None):
        self._ref = ref
        self._actor = actor
        self._pending: list[tuple[tuple[str, str, str | None], asyncio.Future[Grant]]] = []
        self._flushing = False
        # The running flush: the loop keeps only a weak reference to a task.
        self._flush_task: asyncio.Task[None] | None = None
        self._settles: list[Settle] = []
        self.reserve_calls = 0
        self.settle_calls = 0

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            name, namespace = self._ref  # type: ignore[misc]
            self._actor = ray.get_actor(name, namespace=namespace)
        return self._actor

    async def reserve(self, agent_id: str, pool: str, tenant: str | None) -> Grant:
        """Reserve one task's estimate for ``agent_id``; raises if the actor fails."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Grant] = loop.create_future()
        self._pending.append(((agent_id, pool, tenant), fut))
        if not self._flushing:
            self._flushing = True
            # Scheduled after the tasks already runnable, so a batch's first wave of
            # requests (all made in one loop turn) goes in one call.
            self._flush_task = loop.create_task(self._flush_reserves())
        return await fut

    async def _flush_reserves(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    self.reserve_calls += 1
                    grants = await self._handle().reserve_batch.remote([r for r, _ in batch])
                except Exception as exc:  # the actor is gone: these tasks cannot run now
                    self._actor = None if self._ref is not None else self._actor
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(
                                RuntimeError(f"budget actor unavailable: {exc!r}")
                            )
                    continue
                for (_, fut), g in zip(batch, grants):
                    g = Grant(*g)
                    if not fut.done():
                        fut.set_result(g)
                    elif g.reservation_id is not None:
                        # The task was cancelled (timed out) while waiting: give it back.
                        self._settles.append(Settle(g.reservation_id, None))
        finally:
            self._flushing = False

    def settle(self, grant: Grant, usd: float, tokens: int = 0, cpu_s: float = 0.0) -> None:
        """Queue the settlement of ``grant`` at the task's actual usage."""
        self._settles.append(Settle(grant.reservation_id, usd, tokens, cpu_s))  # type: ignore[arg-type]

    def settle_at_estimate(self, grant: Grant, cpu_s: float | None = None) -> None:
        """Queue the settlement of a task whose usage is unknown (it failed, timed out or
        was preempted after it may have spent): count the whole estimate, never
        under-count; ``cpu_s``: its CPU seconds when they are known (the estimate's
        otherwise)."""
        cpu = grant.estimate_cpu_s if cpu_s is None else cpu_s
        self.settle(grant, grant.estimate_usd, grant.estimate_tokens, cpu)

    def release(self, grant: Grant) -> None:
        """Queue the release of a reservation whose task never ran."""
        self._settles.append(Settle(grant.reservation_id, None))  # type: ignore[arg-type]

    async def flush(self) -> None:
        """Send the queued settlements in one call. If the actor is unreachable they are
        dropped: the actor settles unsettled reservations at their estimate when their
        lease expires, so budget is neither leaked nor under-counted."""
        if not self._settles:
            return
        batch, self._settles = self._settles, []
        try:
            self.settle_calls += 1
            await self._handle().settle_batch.remote([tuple(s) for s in batch])
        except Exception:
            if self._ref is not None:
                self._actor = None
