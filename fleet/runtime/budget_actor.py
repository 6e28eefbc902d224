"""The budget actor: the fleet's one budget ledger, enforced on every task.

One named actor per fleet (``Names.budget``), started with the fleet when its spec sets
any budget (``BudgetsSpec.enforced``). It wraps the pure ``fleet.policy.budget``
(``BudgetPolicy`` over an ``InMemoryBudgetStore``): hosts reserve a task's estimate
(``BudgetsSpec.estimate_for`` its pool) before it runs and settle its actual cost after,
in batches (``fleet.runtime.budget_client``).

Why concurrent tasks cannot overspend: the actor runs one call at a time (an async actor
whose methods never await), and each reservation books its estimate on every budget the
task falls under only if all of them still fit ``used + reserved + estimate <= limit``;
settlement replaces the estimate by the actual cost. So however many hosts race for the
last dollar, the granted reservations fit the limit, and what the tasks spend (at most
their estimates) does too.

Leases: every reservation expires ``resilience.task_timeout_s + budgets.
reservation_grace_s`` after it was made. A host settles well before (its watchdog ends
every task within ``task_timeout_s``), so an expired reservation belongs to a host that
died or lost its settle call: a sweep every ``SWEEP_INTERVAL_S`` settles it at its full
estimate (the task may have run and spent; usage is never under-counted) and frees the
rest of the hold. Budget is never leaked, and never given back for work that may have
been done. A late settle of an expired reservation is ignored (it was counted).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray

from fleet.policy.budget import BudgetPolicy, Refusal, Reservation, Usage
from fleet.runtime.budget_client import Grant
from fleet.spec.fleet import FleetSpec

SWEEP_INTERVAL_S = 1.0
AGENT_IDLE_LEAVE_S = 600.0
"""An agent with no reservation for this long leaves the allocation (its host scaled
down or died); what it spent still counts."""


class BudgetBook:
    """The budget actor's state and logic, without Ray (tests drive it directly).

    ``clock`` is a Unix clock in seconds (budget windows align to UTC days and hours).
    """

    def __init__(self, spec: FleetSpec, clock: Callable[[], float] = time.time):
        self.spec = spec
        self.policy = BudgetPolicy.for_fleet(spec, clock)
        self._clock = clock
        self._lease_s = spec.resilience.task_timeout_s + spec.budgets.reservation_grace_s
        b = spec.budgets
        # Allocations may grow at the next rebalance: a refused agent retries then.
        self._recheck_s = b.rebalance_interval_s if b.daily_usd is not None else None
        self._estimates = {p.name: Usage(*b.estimate_for(p.name)) for p in spec.pools}
        self._open: dict[str, tuple[Reservation, float]] = {}  # id -> (reservation, expiry)
        self._seen: dict[str, float] = {}  # agent id -> last reservation request
        self.refused: Counter[str] = Counter()  # refused tasks by refusing scope
        self.expired = 0
        self.expired_usd = 0.0
        self.late_settles = 0

    def reserve_batch(self, requests: list[tuple[str, str, str | None]]) -> list[Grant]:
        """One grant per ``(agent_id, pool, tenant)`` request, in order."""
        now = self._clock()
        for agent_id, pool, _ in requests:
            if agent_id not in self._seen:
                self.policy.join(agent_id, pool)
            self._seen[agent_id] = now
        out = []
        for agent_id, pool, tenant in requests:
            est = self._estimates.get(pool) or Usage(*self.spec.budgets.estimate_for(pool))
            r = self.policy.reserve(agent_id, est, tenant=tenant)
            if isinstance(r, Refusal):
                self.refused[r.scope] += 1
                after = r.retry_after_s
                if r.retry_elsewhere and self._recheck_s is not None:
                    after = min(after, self._recheck_s)
                out.append(Grant(None, est.usd, est.tokens, est.cpu_s, r.scope, r.detail,
                                 r.retry_elsewhere, after))
            else:
                self._open[r.id] = (r, now + self._lease_s)
                out.append(Grant(r.id, est.usd, est.tokens, est.cpu_s))
        return out

    def settle_batch(self, settles: list[tuple[str, float | None, int, float]]) -> int:
        """Settle (or, with usd None, release) reservations; returns how many were open."""
        done = 0
        for rid, usd, tokens, cpu_s in settles:
            entry = self._open.pop(rid, None)
            if entry is None:
                self.late_settles += 1  # expired (counted at its estimate) or a repeat
                continue
            done += 1
            if usd is None:
                self.policy.release(entry[0])
            else:
                self.policy.settle(entry[0], Usage(usd, tokens, cpu_s))
        return done

    def sweep(self) -> int:
        """Settle expired reservations at their estimate; idle agents leave. Returns
        how many reservations expired."""
        now = self._clock()
        expired = [rid for rid, (_, until) in self._open.items() if until <= now]
        for rid in expired:
            r, _ = self._open.pop(rid)
            self.policy.settle(r, r.estimate)
            self.expired += 1
            self.expired_usd += r.estimate.usd
        for agent_id, seen in list(self._seen.items()):
            if now - seen > AGENT_IDLE_LEAVE_S:
                del self._seen[agent_id]
                self.policy.leave(agent_id)
        return len(expired)

    def snapshot(self) -> dict[str, Any]:
        """``BudgetPolicy.snapshot`` plus the runtime's counts: open reservations and
        the USD they hold, refused tasks by scope, expired leases."""
        snap = self.policy.snapshot()
        snap["open_reservations"] = len(self._open)
        snap["open_reserved_usd"] = sum(r.estimate.usd for r, _ in self._open.values())
        snap["refused_tasks"] = dict(self.refused)
        snap["expired_reservations"] = self.expired
        snap["expired_usd"] = self.expired_usd
        snap["late_settles"] = self.late_settles
        snap["reserved_total"] = self.policy.reserved_count
        snap["settled_total"] = self.policy.settled_count
        return snap


@ray.remote(num_cpus=0)
class BudgetActor:
    """The named budget actor (see the module docstring). Its methods never await, so
    each call runs whole before the next: reservations are serialized."""

    def __init__(self, spec: dict[str, Any]):
        self.book = BudgetBook(FleetSpec.model_validate(spec))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self.book.sweep()
            except Exception:  # a failed sweep must not stop the next ones
                pass

    async def reserve_batch(self, requests: list[tuple[str, str, str | None]]) -> list[Grant]:
        return self.book.reserve_batch(requests)

    async def settle_batch(self, settles: list[tuple[str, float | None, int, float]]) -> int:
        return self.book.settle_batch(settles)

    async def snapshot(self) -> dict[str, Any]:
        return self.book.snapshot()

    async def poll_alerts(self) -> list[dict[str, Any]]:
        """Alerts raised since the last call (usage passed a threshold of a budget)."""
        return [{"at_unix_s": a.at_s, "key": a.key, "threshold": a.threshold,
                 "used": a.used, "limit": a.limit, "message": a.message}
                for a in self.book.policy.poll_alerts()]
