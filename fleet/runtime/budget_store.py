"""The budget actor's durable state: one SQLite file per fleet, written through.

The budget actor (``fleet.runtime.budget_actor``) keeps its state in memory, as the pure
``fleet.policy.budget`` does, and writes every change of a call to this file in one
transaction committed before the call returns. A restart (or a redeploy of the fleet on
the same storage directory) reads it back: the same spend, the same open reservations,
the same alerts already fired. The policy package stays free of SQLite (it is pure and
runs in the simulator); this module is its storage layer, as ``fleet.queue.storage`` is
the queues'.

The file ``<queues.storage.directory>/<namespace>/<fleet>/budget.sqlite3``, WAL mode
(``queues.storage.sqlite_synchronous``: ``normal`` survives kill -9 of the process,
``full`` also a power loss), holds:

- ``meta(name, value)``: ``schema_version``; ``state``: JSON of the scalars (day,
  reservation sequence, totals of the policy and of the actor).
- ``counters(key, idx, used)``: what each budget counter (budget key, window index)
  has used, in integer units. What it has reserved is not stored: it is by definition
  the sum of the open reservations' amounts on it, recomputed at load, so a reservation
  writes one row, not one per budget it falls under. Limits are not stored either: the
  policy sets them from the spec and its allocation at start.
- ``reservations(id, amounts, agent, pool, class, tenant, usd, tokens, cpu_s, at_s,
  expires_s)``: the open reservations, ``amounts`` JSON ``[[key, idx, units], ...]``
  booked per counter, and the lease the actor keeps on each: what was estimated, by whom,
  when the lease ends (one row per reservation: half the writes of two tables).
- ``stats(name, spend_usd, tokens, cpu_s, tasks)``: today's spend per scope.
- ``alerts(key, idx, threshold, at_s, used, limit_value, ends_s, polled)``: alerts
  fired in windows not yet forgotten (``fleet.policy.budget.alert_kept``), in firing
  order; ``polled`` once the controller has taken them (``poll_alerts``), so an alert
  raised just before a kill is still delivered after the restart.

A write that fails (disk full, read-only) rolls back whole and raises
``fleet.queue.storage.storage_error``; what was committed before stays intact.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet.policy.budget import (
    BudgetAlert,
    Entry,
    InMemoryBudgetStore,
    PolicyState,
    Reservation,
    StoreRefusal,
    Usage,
    window_end_s,
)
from fleet.queue.storage import StorageError, fleet_directory, open_wal, storage_error
from fleet.spec.budgets import DAY_S
from fleet.spec.fleet import FleetSpec
from fleet.spec.queues import StorageBackend

SCHEMA_VERSION = 1
BUDGET_FILE = "budget.sqlite3"

Write = tuple[str, Sequence[Sequence[Any]]]
"""One statement and its rows, for ``BudgetDatabase.write``."""

Lease = tuple[Reservation, float]
"""An open reservation and when its lease ends (Unix seconds)."""

_TABLES = (
    "CREATE TABLE IF NOT EXISTS counters (key TEXT NOT NULL, idx INTEGER NOT NULL,"
    " used INTEGER NOT NULL, PRIMARY KEY (key, idx)) WITHOUT ROWID",
    # The lease columns are NULL for a reservation made without one (``keep_lease``).
    "CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, amounts TEXT NOT NULL,"
    " agent TEXT, pool TEXT, class TEXT, tenant TEXT, usd REAL, tokens INTEGER,"
    " cpu_s REAL, at_s REAL, expires_s REAL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, spend_usd REAL NOT NULL,"
    " tokens INTEGER NOT NULL, cpu_s REAL NOT NULL, tasks INTEGER NOT NULL) WITHOUT ROWID",
    # A rowid table: rowid keeps the firing order.
    "CREATE TABLE IF NOT EXISTS alerts (key TEXT NOT NULL, idx INTEGER NOT NULL,"
    " threshold REAL NOT NULL, at_s REAL NOT NULL, used REAL NOT NULL,"
    " limit_value REAL NOT NULL, ends_s REAL NOT NULL, polled INTEGER NOT NULL,"
    " UNIQUE (key, idx, threshold))",
)
_PUT_COUNTER = "INSERT OR REPLACE INTO counters (key, idx, used) VALUES (?, ?, ?)"
_DROP_COUNTER = "DELETE FROM counters WHERE key = ? AND idx = ?"
_PUT_RESERVATION = (
    "INSERT OR REPLACE INTO reservations (id, amounts, agent, pool, class,"
    " tenant, usd, tokens, cpu_s, at_s, expires_s)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DROP_RESERVATION = "DELETE FROM reservations WHERE id = ?"
_NO_LEASE = (None,) * 9
_PUT_STATS = (
    "INSERT OR REPLACE INTO stats (name, spend_usd, tokens, cpu_s, tasks)"
    " VALUES (?, ?, ?, ?, ?)"
)
_PUT_ALERT = (
    "INSERT OR IGNORE INTO alerts (key, idx, threshold, at_s, used, limit_value,"
    " ends_s, polled) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_PUT_META = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)"
_KEY_CACHE_SIZE = 65_536


def budget_path(spec: FleetSpec) -> Path | None:
    """The budget actor's file for ``spec``, or None with the ``memory`` backend."""
    storage = spec.queues.storage
    if storage.backend is StorageBackend.MEMORY:
        return None
    return fleet_directory(storage, spec.namespace, spec.name) / BUDGET_FILE


class BudgetDatabase:
    """The budget file: its schema and version check, reads, and ``write``, one
    transaction per call. Single-threaded, like the actor that owns it."""

    def __init__(self, path: str | os.PathLike[str], synchronous: str = "normal"):
        self.path = Path(path)
        try:
            self._db = open_wal(self.path, synchronous)  # one transaction per call
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(self.path, exc) from exc
        found = self.meta("schema_version")
        if found is None:
            self._create()
        elif found != str(SCHEMA_VERSION):
            self._db.close()
            raise StorageError(
                f"budget state {self.path} has schema version {found}, this fleet reads "
                f"version {SCHEMA_VERSION}: run the fleet version that wrote it, or move "
                "the file away (the fleet's budgets then start from zero)"
            )

    def _create(self) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            for sql in _TABLES:
                db.execute(sql)
            db.execute(_PUT_META, ("schema_version", str(SCHEMA_VERSION)))
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            raise storage_error(self.path, exc) from exc

    def meta(self, name: str) -> str | None:
        rows = self.rows("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(self.path, exc) from exc

    def write(self, writes: Iterable[Write]) -> None:
        """Run every statement over its rows in one transaction: all of it is durable
        when this returns, or none of it (rolled back; raises ``storage_error``)."""
        db = self._db
        try:
            db.execute("BEGIN")
            for sql, rows in writes:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            raise storage_error(self.path, exc) from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        # SQLite may have rolled back already (it does on some I/O errors).
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        self._db.close()

    # -- the actor's tables (the store's are in SqliteBudgetStore) -------------------------
    def load_policy(self) -> tuple[PolicyState, dict[str, Any]]:
        """The policy's saved state, and the actor's own totals (see ``meta_json``)."""
        raw = self.meta("state")
        meta: dict[str, Any] = json.loads(raw) if raw else {}
        p = meta.get("policy", {})
        stats = {
            name: (spend, tokens, cpu_s, tasks)
            for name, spend, tokens, cpu_s, tasks in self.rows(
                "SELECT name, spend_usd, tokens, cpu_s, tasks FROM stats"
            )
        }
        alerts = [
            (BudgetAlert(at_s, key, idx, threshold, used, limit), bool(polled))
            for key, idx, threshold, at_s, used, limit, polled in self.rows(
                "SELECT key, idx, threshold, at_s, used, limit_value, polled"
                " FROM alerts ORDER BY rowid"
            )
        ]
        state = PolicyState(
            p.get("day"),
            p.get("seq", 0),
            p.get("reserved_count", 0),
            p.get("settled_count", 0),
            p.get("overrun_usd", 0.0),
            p.get("refusals", {}),
            stats,
            alerts,
        )
        return state, meta.get("book", {})

    @staticmethod
    def meta_json(policy: PolicyState, book: Mapping[str, Any]) -> str:
        """The ``state`` row: the policy's scalars and the actor's totals."""
        return json.dumps(
            {
                "policy": {
                    "day": policy.day,
                    "seq": policy.seq,
                    "reserved_count": policy.reserved_count,
                    "settled_count": policy.settled_count,
                    "overrun_usd": policy.overrun_usd,
                    "refusals": policy.refusals,
                },
                "book": book,
            },
            sort_keys=True,
        )

    @staticmethod
    def policy_writes(changes: PolicyState, meta_json: str | None) -> list[Write]:
        """What ``take_changes`` reported, as writes (in memory order: a new day's
        clearing before the rows changed after it)."""
        out: list[Write] = []
        if changes.new_day and changes.day is not None:
            out.append(("DELETE FROM stats", [()]))
            # The rule of ``alert_kept``: keep the windows that end after yesterday began.
            out.append(
                ("DELETE FROM alerts WHERE ends_s <= ?", [((changes.day - 1) * DAY_S,)])
            )
        if changes.stats:
            out.append((_PUT_STATS, [(n, *row) for n, row in changes.stats.items()]))
        if changes.alerts:
            out.append(
                (
                    _PUT_ALERT,
                    [
                        (
                            a.key,
                            a.window_index,
                            a.threshold,
                            a.at_s,
                            a.used,
                            a.limit,
                            window_end_s(a.key, a.window_index),
                            int(polled),
                        )
                        for a, polled in changes.alerts
                    ],
                )
            )
        if meta_json is not None:
            out.append((_PUT_META, [("state", meta_json)]))
        return out

    @staticmethod
    def alerts_polled() -> Write:
        """The write that marks every alert taken by ``poll_alerts``."""
        return ("UPDATE alerts SET polled = 1 WHERE polled = 0", [()])


class SqliteBudgetStore(InMemoryBudgetStore):
    """A ``BudgetStore`` kept in memory (as ``InMemoryBudgetStore``) and in a
    ``BudgetDatabase``: every change is noted and written by the next ``commit``, or
    handed by ``pending`` to a caller that writes it in its own transaction.

    Loads the counters and open reservations the file holds. Limits are not stored:
    whoever builds the store sets them (the policy, from the spec and its allocation).
    A reservation may carry its owner's lease (``keep_lease``), stored in its row and
    gone with it when it is settled or released. On a failed ``commit`` memory is
    reloaded from the file, so the two always agree. Single-threaded, like the actor
    that owns it.
    """

    def __init__(self, db: BudgetDatabase):
        super().__init__()
        self.db = db
        self._touched: set[Entry] = set()  # counters whose use changed since the last write
        self._dropped: set[Entry] = set()  # counters expired since the last write
        self._booked: dict[str, dict[Entry, int] | None] = {}  # opened / closed (None)
        self._new_leases: dict[str, Lease] = {}  # leases of reservations opened
        self.leases: dict[str, Lease] = {}  # the leases loaded (see ``keep_lease``)
        self._key_json: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        self._used.clear()
        self._reserved.clear()
        self._reservations.clear()
        self._touched, self._dropped, self._booked = set(), set(), {}
        self._new_leases = {}
        self.leases = {}
        # Every stored counter comes back, zeros included, so ``expire`` drops (and
        # deletes) it as it would have without the restart.
        used, reserved = self._used, self._reserved
        for key, idx, n in self.db.rows("SELECT key, idx, used FROM counters"):
            used[(key, idx)] = n
        for (
            rid,
            amounts,
            agent,
            pool,
            cls,
            tenant,
            usd,
            tokens,
            cpu_s,
            at_s,
            until,
        ) in self.db.rows(
            "SELECT id, amounts, agent, pool, class, tenant, usd, tokens,"
            " cpu_s, at_s, expires_s FROM reservations"
        ):
            booked = self._reservations[rid] = {(k, i): a for k, i, a in json.loads(amounts)}
            for e, a in booked.items():  # reserved: the sum of the open reservations
                reserved[e] = reserved.get(e, 0) + a
            if agent is not None:
                self.leases[rid] = (
                    Reservation(
                        rid,
                        agent,
                        pool,
                        cls,
                        tenant,
                        Usage(usd, tokens, cpu_s),
                        at_s,
                        tuple(booked),
                    ),
                    until,
                )

    def keep_lease(self, lease: Lease) -> None:
        """Store ``lease`` with its reservation (booked since the last write), so a
        restart finds it in ``leases``."""
        self._new_leases[lease[0].id] = lease

    def try_reserve(
        self, reservation_id: str, amounts: Mapping[Entry, int]
    ) -> StoreRefusal | None:
        refused = super().try_reserve(reservation_id, amounts)
        if refused is None:
            self._booked[reservation_id] = self._reservations[reservation_id]
        return refused

    def settle(
        self, reservation_id: str, actual: Mapping[Entry, int]
    ) -> dict[Entry, int] | None:
        booked = self._reservations.get(reservation_id)
        out = super().settle(reservation_id, actual)
        if booked is not None:
            self._touched.update(booked)
            self._booked[reservation_id] = None
        return out

    def release(self, reservation_id: str) -> bool:
        out = super().release(reservation_id)
        if out:
            self._booked[reservation_id] = None
        return out

    def expire(self, min_index: Mapping[str, int]) -> int:
        before = set(self._used) | set(self._reserved)
        n = super().expire(min_index)
        if n:
            gone = before.difference(self._used, self._reserved)
            self._dropped |= gone
            self._touched -= gone
        return n

    def entries(self) -> set[Entry]:
        """Every counter held."""
        return set(self._used) | set(self._reserved)

    @property
    def reservations(self) -> Mapping[str, Mapping[Entry, int]]:
        """Open reservation id -> amount booked per counter (read only)."""
        return self._reservations

    def pending(self) -> list[Write]:
        """The writes of every change since the last call (and forget them)."""
        used = self._used
        out: list[Write] = []
        if self._dropped:
            out.append((_DROP_COUNTER, list(self._dropped)))
        if self._touched:
            out.append((_PUT_COUNTER, [(k, i, used.get((k, i), 0)) for k, i in self._touched]))
        booked = self._booked
        if booked:
            drop = [(rid,) for rid, a in booked.items() if a is None]
            leases = self._new_leases
            put = [
                (rid, self._encode(a), *self._lease_row(leases.get(rid)))
                for rid, a in booked.items()
                if a is not None
            ]
            out.extend(w for w in ((_DROP_RESERVATION, drop), (_PUT_RESERVATION, put)) if w[1])
        self._touched, self._dropped, self._booked = set(), set(), {}
        self._new_leases = {}
        return out

    @staticmethod
    def _lease_row(lease: Lease | None) -> tuple[Any, ...]:
        if lease is None:
            return _NO_LEASE
        r, until = lease
        est = r.estimate
        return (
            r.agent_id,
            r.pool,
            r.priority_class,
            r.tenant,
            est.usd,
            est.tokens,
            est.cpu_s,
            r.at_s,
            until,
        )

    def _encode(self, amounts: Mapping[Entry, int]) -> str:
        """``amounts`` as JSON ``[[key, idx, units], ...]``. Keys repeat across
        reservations, so each key's JSON is made once (half the cost of json.dumps)."""
        cache = self._key_json
        parts = []
        for (key, idx), n in amounts.items():
            k = cache.get(key)
            if k is None:
                if len(cache) >= _KEY_CACHE_SIZE:
                    cache.clear()
                k = cache[key] = json.dumps(key)
            parts.append(f"[{k},{idx},{n}]")
        return f"[{','.join(parts)}]"

    def commit(self) -> None:
        """Write every change since the last write in one transaction; on failure
        reload from the file (memory then matches what was committed) and raise."""
        writes = self.pending()
        if not writes:
            return
        try:
            self.db.write(writes)
        except StorageError:
            self._load()
            raise
