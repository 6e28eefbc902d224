"""The budget actor: the fleet's one budget ledger, enforced on every task.

One named actor per fleet (``Names.budget``), started with the fleet when its spec sets
any budget (``BudgetsSpec.enforced``). It wraps the pure ``fleet.policy.budget``
(``BudgetPolicy`` over a ``SqliteBudgetStore``, or an ``InMemoryBudgetStore`` with the
``memory`` storage backend): hosts reserve a task's estimate
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

Durability: with the ``sqlite`` storage backend (the default) every call that changes
the book (``reserve_batch``, ``settle_batch``, ``sweep``, ``poll_alerts``) writes its
changes to ``budget.sqlite3`` in the fleet's storage directory in one transaction before
it returns (``fleet.runtime.budget_store`` describes the file). Ray restarts the actor
when its process dies, and its ``__init__`` (like a redeploy on the same directory)
reads the file back: the day's spend, every open reservation with its estimate and
lease (a late settle of one still counts once; an expired one is settled at its estimate
by the sweep), the alerts already fired (and those not yet polled), the day. Agents
join again as they reserve; until then what they spent today counts as spent by
departed agents, as when they leave. A write that fails (disk full) raises
``StorageFull`` naming the file and leaves memory as the file is (reloaded from it):
nothing of the failed call is granted or counted. With the ``memory`` backend state
lives in memory only and a restart starts from zero.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray

from fleet.policy.budget import (
    BudgetAlert,
    BudgetPolicy,
    Refusal,
    Usage,
    parse_key,
    window_index,
)
from fleet.queue.storage import StorageError
from fleet.runtime.budget_client import Grant
from fleet.runtime.budget_store import (
    BudgetDatabase,
    Lease,
    SqliteBudgetStore,
    Write,
    budget_path,
)
from fleet.runtime.lifecycle import on_start, resume_after_restart
from fleet.runtime.names import Names
from fleet.spec.fleet import FleetSpec

SWEEP_INTERVAL_S = 1.0
AGENT_IDLE_LEAVE_S = 600.0
"""An agent with no reservation for this long leaves the allocation (its host scaled
down or died); what it spent still counts."""


class BudgetBook:
    """The budget actor's state and logic, without Ray (tests drive it directly).

    ``clock`` is a Unix clock in seconds (budget windows align to UTC days and hours).
    ``path``: the SQLite file that keeps the state across restarts (written through,
    one transaction per call), or None to keep it in memory only.
    """

    def __init__(
        self,
        spec: FleetSpec,
        clock: Callable[[], float] = time.time,
        path: str | os.PathLike[str] | None = None,
    ):
        self.spec = spec
        self._clock = clock
        self._lease_s = spec.resilience.task_timeout_s + spec.budgets.reservation_grace_s
        b = spec.budgets
        # Allocations may grow at the next rebalance: a refused agent retries then.
        self._recheck_s = b.rebalance_interval_s if b.daily_usd is not None else None
        self._estimates = {p.name: Usage(*b.estimate_for(p.name)) for p in spec.pools}
        self._db = (
            BudgetDatabase(path, spec.queues.storage.sqlite_synchronous)
            if path is not None
            else None
        )
        self._load()

    def _load(self) -> None:
        """(Re)build the state: empty, or what the file holds."""
        db = self._db
        store = self._store = SqliteBudgetStore(db) if db is not None else None
        self.policy = BudgetPolicy.for_fleet(self.spec, self._clock, store)
        self._open: dict[str, Lease] = {}  # id -> (reservation, expiry)
        self._seen: dict[str, float] = {}  # agent id -> last reservation request
        self.refused: Counter[str] = Counter()  # refused tasks by refusing scope
        self.expired = 0
        self.expired_usd = 0.0
        self.late_settles = 0
        self._written: str | None = None  # the meta row as last written
        if db is None or store is None:
            return
        state, totals = db.load_policy()
        today = window_index("daily", self._clock())
        spent_today = {
            parse_key(key)[1]
            for key, idx in store.entries()
            if idx == today and key.startswith("agent:") and key.endswith(":usd:daily")
        }
        self.policy.restore(state, spent_today)
        self._open = dict(store.leases)
        self.refused.update(totals.get("refused", {}))
        self.expired = totals.get("expired", 0)
        self.expired_usd = totals.get("expired_usd", 0.0)
        self.late_settles = totals.get("late_settles", 0)
        self._written = db.meta("state")
        self.policy.record_changes()

    def _commit(self, *extra: Write) -> None:
        """Write what the last call changed in one transaction (nothing if nothing
        did). On failure the state is reloaded from the file, so memory never holds
        what the file does not: the call's grants and settlements are void."""
        db, store = self._db, self._store
        if db is None or store is None:
            return
        changes = self.policy.take_changes()
        meta = db.meta_json(
            changes,
            {
                "refused": self.refused,
                "expired": self.expired,
                "expired_usd": self.expired_usd,
                "late_settles": self.late_settles,
            },
        )
        writes = [
            *store.pending(),
            *db.policy_writes(changes, meta if meta != self._written else None),
            *extra,
        ]
        if not writes:
            return
        try:
            db.write(writes)
        except StorageError:
            self._load()
            raise
        self._written = meta

    def reserve_batch(self, requests: list[tuple[str, str, str | None]]) -> list[Grant]:
        """One grant per ``(agent_id, pool, tenant)`` request, in order; durable when
        it returns (raises ``StorageError`` and grants nothing if it cannot be)."""
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
                out.append(
                    Grant(
                        None,
                        est.usd,
                        est.tokens,
                        est.cpu_s,
                        r.scope,
                        r.detail,
                        r.retry_elsewhere,
                        after,
                    )
                )
            else:
                lease = self._open[r.id] = (r, now + self._lease_s)
                if self._store is not None:
                    self._store.keep_lease(lease)
                out.append(Grant(r.id, est.usd, est.tokens, est.cpu_s))
        self._commit()
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
        self._commit()
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
        self._commit()
        return len(expired)

    def poll_alerts(self) -> list[BudgetAlert]:
        """Alerts raised since the last call; after a restart, also those raised before
        it and not yet polled."""
        alerts = self.policy.poll_alerts()
        if alerts and self._db is not None:
            self._commit(self._db.alerts_polled())
        return alerts

    def close(self) -> None:
        """Release the file (everything is already committed)."""
        if self._db is not None:
            self._db.close()

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
        fleet_spec = FleetSpec.model_validate(spec)  # for the names: cheap, no I/O
        restarted = on_start(fleet_spec.namespace, Names(fleet_spec.name).budget)
        self.book = BudgetBook(fleet_spec, path=budget_path(fleet_spec))
        self._task: asyncio.Task[None] | None = None
        if restarted:  # deploy called start() once; after a Ray restart nobody does
            resume_after_restart("start")

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
        return [
            {
                "at_unix_s": a.at_s,
                "key": a.key,
                "threshold": a.threshold,
                "used": a.used,
                "limit": a.limit,
                "message": a.message,
            }
            for a in self.book.poll_alerts()
        ]
