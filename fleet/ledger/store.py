"""Where the ledger keeps outcomes: one interface, an in-memory and a SQLite backend.

An outcome is keyed by (tenant, task id); the first one recorded for a key wins.
Each row counts the task's *duplicate executions*: executions that started beyond the
first (``beyond_first``). An outcome carries its delivery number, so a rerun is counted
even when the run before it never reached the ledger (its host crashed): delivery ``d``
means ``d - 1`` earlier deliveries, less those the runtime *excused* (handed back by a
retry decision or never started; see ``Ledger.record``). A later outcome for a recorded
key raises the count to what its own delivery number implies, and by one more when it
repeats the recorded delivery number (two runs of one delivery). A record that repeats
the *same* execution (same agent, same start time: a host's record call retried after
the ledger restarted) is a replay, not a duplicate, and changes nothing.

Durability contract of ``SqliteLedgerStore``: ``record`` commits before it returns, so
an outcome a host was told is recorded survives the death of the ledger's process (WAL
mode; ``synchronous=NORMAL`` survives kill -9, ``FULL`` also power loss). A failed
commit (disk full, I/O error) rolls back, raises ``StorageError`` naming the file, and
leaves every earlier outcome intact.

Memory stays bounded: the rows (outputs included) live on disk, keyed by a record
sequence number (appends, cheap), with an index by finish time (retention). What stays
in memory is a compact index from a 64-bit hash of the key to the row's sequence
number, ~16 bytes per outcome in two numpy arrays plus a small dict of the newest
entries. Why not an SQL index on the key: measured on this machine, a B-tree index on
random keys cut inserts at 1M rows from ~94,000 to ~18,000 rows/s (every batch rewrote
hundreds of random index pages to the WAL); the in-memory index costs nothing on disk
and is rebuilt from the rows in one scan on start. A hash hit is always confirmed
against the row's stored key, so collisions cost a read, never a wrong answer.

Listing a tenant's outcomes (``owned``, behind ``GET /tasks``): each row of a task
submitted through the ingress names its tenant (``owner``, from the scoped id,
``fleet.task.tenant_of_id``), indexed by (owner, seq). Sequence numbers only grow, so
that index appends at the end of each tenant's range (unlike an index on random ids);
it is partial, so rows of unscoped ids (``FleetClient``, Kafka) cost it nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fleet._bounded import BoundedSet
from fleet.queue.storage import StorageError, open_wal, storage_error
from fleet.task import Outcome, tenant_of_id

DEFAULT_TENANT = "default"
SCHEMA_VERSION = 3
# New index entries are kept in a dict and merged into the sorted arrays in batches of
# this many (a merge is O(n) numpy work: ~10 ms at 1M outcomes).
INDEX_MERGE_AT = 65_536
SINCE_LIMIT = 100_000
# Keys of the newest outcomes kept in memory (~120 bytes each): ``missing`` answers for
# them without reading a row.
RECENT_KEYS = 100_000
_SQL_VARS = 500  # ids per IN (...) query, below SQLite's variable limit
MAX_SEQ = 1 << 62  # above every sequence number (SQLite integers are 64-bit)


def key_hash(tenant: str, task_id: str) -> int:
    """A stable signed 64-bit hash of (tenant, id): the ledger's index key."""
    digest = hashlib.blake2b(f"{tenant}\x00{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def beyond_first(deliveries: int, excused: int = 0) -> int:
    """Executions that started before this one, for an outcome of delivery number
    ``deliveries`` of which ``excused`` earlier deliveries are known not to count."""
    return max(0, deliveries - 1 - excused)


def duplicates_after(dups: int, stored: int, o: Outcome, excused: int = 0) -> int:
    """A row's duplicate count once ``o`` (not a replay) is recorded for its key, when
    the row holds ``dups`` and its outcome has delivery number ``stored``."""
    return max(dups + (o.deliveries == stored), beyond_first(o.deliveries, excused))


def is_replay(a: Outcome, b: Outcome) -> bool:
    """Whether ``b`` reports the same execution as ``a`` (a retried record call)."""
    return (
        a.agent_id == b.agent_id
        and a.started_unix_s == b.started_unix_s
        and a.finished_unix_s == b.finished_unix_s
        and a.deliveries == b.deliveries
    )


class LedgerStore(Protocol):
    """One ledger shard's outcomes."""

    durable: bool

    def record(
        self,
        outcomes: Sequence[Outcome],
        tenant: str = DEFAULT_TENANT,
        excused: Sequence[int] | None = None,
    ) -> int:
        """Record outcomes (first per key wins); returns how many were new.
        ``excused[k]``: earlier deliveries of ``outcomes[k]`` that are not duplicate
        executions (see the module docstring)."""

    def get(self, ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[Outcome | None]:
        """The recorded outcome of each id, or None."""

    def missing(self, ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        """The ids among ``ids`` with no recorded outcome."""

    def duplicates(
        self, ids: Sequence[str] | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, int]:
        """Duplicate executions per id (ids with none left out); all ids if None."""

    def owned(
        self, owner: str | None, before: int | None, limit: int, ok: bool | None = None
    ) -> list[tuple[int, Outcome]]:
        """Up to ``limit`` outcomes of tasks tenant ``owner`` submitted through the
        ingress (None: every outcome), recorded before sequence number ``before`` (None:
        from the newest), newest first, as (seq, outcome); only succeeded or failed ones
        if ``ok`` says."""

    def since(self, cursor: int, limit: int = SINCE_LIMIT) -> tuple[list[str], int]:
        """Ids recorded after ``cursor`` (in record order) and the cursor to pass next."""

    def cursor(self) -> int:
        """The cursor of the newest record (``since(cursor())`` returns later ones)."""

    def count(self) -> int:
        """Outcomes held."""

    def expire(self, before_unix_s: float) -> int:
        """Delete outcomes of tasks finished before ``before_unix_s``; returns how many."""

    def close(self) -> None: ...


# --- memory -------------------------------------------------------------------------


class MemoryLedgerStore:
    """Outcomes in dicts: for tests and throwaway runs (``queues.storage.backend:
    memory``). Lost with the process."""

    durable = False

    def __init__(self) -> None:
        self._book: dict[tuple[str, str], Outcome] = {}
        self._dups: Counter[tuple[str, str]] = Counter()
        self._log: list[str] = []  # ids in record order; the cursor is an index into it
        # owner -> its seqs (``_log`` index + 1) and keys, in record order
        self._owned: dict[str, tuple[list[int], list[tuple[str, str]]]] = {}

    def record(
        self,
        outcomes: Sequence[Outcome],
        tenant: str = DEFAULT_TENANT,
        excused: Sequence[int] | None = None,
    ) -> int:
        new = 0
        book, dups = self._book, self._dups
        for k, o in enumerate(outcomes):
            key = (tenant, o.task_id)
            old = book.get(key)
            exc = excused[k] if excused is not None else 0
            if old is None:
                book[key] = o
                self._log.append(o.task_id)
                if (owner := tenant_of_id(o.task_id)) is not None:
                    seqs, keys = self._owned.setdefault(owner, ([], []))
                    seqs.append(len(self._log))
                    keys.append(key)
                new += 1
                if o.deliveries > 1:
                    dups[key] = beyond_first(o.deliveries, exc)
            elif not is_replay(old, o):
                dups[key] = duplicates_after(dups.get(key, 0), old.deliveries, o, exc)
        return new

    def get(self, ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[Outcome | None]:
        book = self._book
        return [book.get((tenant, i)) for i in ids]

    def missing(self, ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        book = self._book
        return [i for i in ids if (tenant, i) not in book]

    def duplicates(
        self, ids: Sequence[str] | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, int]:
        if ids is None:
            return {i: n for (_, i), n in self._dups.items()}
        return {i: n for i in ids if (n := self._dups.get((tenant, i), 0))}

    def owned(
        self, owner: str | None, before: int | None, limit: int, ok: bool | None = None
    ) -> list[tuple[int, Outcome]]:
        if owner is None:
            seqs = list(range(1, len(self._log) + 1))
            keys = [(DEFAULT_TENANT, i) for i in self._log]
        else:
            seqs, keys = self._owned.get(owner, ([], []))
        end = len(seqs) if before is None else bisect.bisect_left(seqs, before)
        out: list[tuple[int, Outcome]] = []
        for k in range(end - 1, -1, -1):
            if len(out) >= limit:
                break
            o = self._book.get(keys[k])
            if o is not None and (ok is None or o.ok == ok):  # None: expired
                out.append((seqs[k], o))
        return out

    def since(self, cursor: int, limit: int = SINCE_LIMIT) -> tuple[list[str], int]:
        out = self._log[cursor : cursor + limit]
        return out, cursor + len(out)

    def cursor(self) -> int:
        return len(self._log)

    def count(self) -> int:
        return len(self._book)

    def expire(self, before_unix_s: float) -> int:
        old = [k for k, o in self._book.items() if o.finished_unix_s < before_unix_s]
        for k in old:
            del self._book[k]
            self._dups.pop(k, None)
        return len(old)

    def close(self) -> None:
        pass


# --- the in-memory index of the SQLite store -------------------------------------------


class HashIndex:
    """64-bit key hash -> row sequence numbers, in ~16 bytes per entry.

    Sorted numpy arrays hold the bulk; new entries go to a dict, merged into the arrays
    every ``INDEX_MERGE_AT`` entries. Several rows may share a hash (a collision): the
    arrays then hold the key more than once, and a colliding new entry forces a merge
    first, so the dict never holds two rows for one hash.
    """

    def __init__(self, keys: np.ndarray | None = None, seqs: np.ndarray | None = None):
        if keys is None or seqs is None:
            keys = np.empty(0, dtype=np.int64)
            seqs = np.empty(0, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._seqs = seqs[order]
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._seqs.nbytes

    def add(self, h: int, seq: int) -> None:
        if h in self._recent:
            self.merge()
        self._recent[h] = seq
        if len(self._recent) >= INDEX_MERGE_AT:
            self.merge()

    def merge(self) -> None:
        if not self._recent:
            return
        rk = np.fromiter(self._recent.keys(), dtype=np.int64, count=len(self._recent))
        rs = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        order = np.argsort(rk)
        rk, rs = rk[order], rs[order]
        pos = np.searchsorted(self._keys, rk)
        self._keys = np.insert(self._keys, pos, rk)
        self._seqs = np.insert(self._seqs, pos, rs)
        self._recent.clear()

    def lookup(self, hs: Sequence[int]) -> list[list[int]]:
        """For each hash, the sequence numbers of the rows that may hold it."""
        out: list[list[int]] = [[] for _ in hs]
        recent = self._recent
        if recent:
            for k, h in enumerate(hs):
                s = recent.get(h)
                if s is not None:
                    out[k].append(s)
        n = len(self._keys)
        if n and hs:
            arr = np.fromiter(hs, dtype=np.int64, count=len(hs))
            lo = np.searchsorted(self._keys, arr, side="left")
            hit = np.nonzero(self._keys[np.minimum(lo, n - 1)] == arr)[0]
            if len(hit):
                hi = np.searchsorted(self._keys, arr[hit], side="right")
                keys_seqs = self._seqs
                for k, a, b in zip(hit.tolist(), lo[hit].tolist(), hi.tolist()):
                    out[k].extend(keys_seqs[a:b].tolist())
        return out


# --- SQLite ---------------------------------------------------------------------------

_OWNER_INDEX = (
    "CREATE INDEX IF NOT EXISTS outcomes_owner ON outcomes (owner, seq)"
    " WHERE owner IS NOT NULL"
)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS outcomes (
        seq INTEGER PRIMARY KEY,
        h INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        ok INTEGER NOT NULL,
        output BLOB,
        reason TEXT,
        error TEXT,
        agent_id TEXT,
        pool TEXT,
        deliveries INTEGER NOT NULL,
        submitted_unix_s REAL NOT NULL,
        started_unix_s REAL,
        finished_unix_s REAL NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        payload_hash INTEGER,
        degraded TEXT,
        duplicates INTEGER NOT NULL DEFAULT 0,
        owner TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS outcomes_finished ON outcomes (finished_unix_s)",
    _OWNER_INDEX,
)
# What a file of each older schema version needs to read as the current one.
_MIGRATIONS: dict[str, tuple[str, ...]] = {
    "1": (
        "ALTER TABLE outcomes ADD COLUMN owner TEXT",
        # tenant_of_id in SQL: '@<tenant>:<id>'
        "UPDATE outcomes SET owner = substr(id, 2, instr(id, ':') - 2)"
        " WHERE substr(id, 1, 1) = '@' AND instr(id, ':') > 0",
        _OWNER_INDEX,
        "ALTER TABLE outcomes ADD COLUMN degraded TEXT",
    ),
    "2": ("ALTER TABLE outcomes ADD COLUMN degraded TEXT",),
}
_OUTCOME_COLS = (
    "id, ok, output, reason, error, agent_id, pool, deliveries, submitted_unix_s,"
    " started_unix_s, finished_unix_s, input_tokens, output_tokens, cost_usd,"
    " payload_hash, degraded"
)
_INSERT = (
    f"INSERT INTO outcomes (seq, h, tenant, {_OUTCOME_COLS}, duplicates, owner)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _outcome(row: Sequence[Any]) -> Outcome:
    """An ``Outcome`` from a row of the outcomes table (SQLite stores ``ok`` as 0/1)."""
    return Outcome(row[0], bool(row[1]), *row[2:])


class SqliteLedgerStore:
    """Outcomes in a SQLite file (WAL); see the module docstring.

    Single-threaded like the actor that owns it; one process per file.
    """

    durable = True

    def __init__(
        self, path: str | os.PathLike[str], synchronous: str = "normal", cache_mib: int = 16
    ):
        self.path = Path(path)
        try:
            self._db = open_wal(self.path, synchronous, cache_mib)
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"ledger file {self.path} cannot be opened: {exc}") from None
        except OSError as exc:
            raise storage_error(self.path, exc) from None
        self._index, self._next_seq, self._count = self._load_index()
        # The newest keys recorded by this process, to answer ``missing`` for them without
        # reading their rows: the ids waiters and the Kafka intake ask about are recent.
        self._recent = BoundedSet(RECENT_KEYS)

    def _check_schema(self) -> None:
        db = self._db
        tables = {
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = row[0] if row else None
            if version in _MIGRATIONS:
                self._migrate(version)
                return
            if version != str(SCHEMA_VERSION):
                raise StorageError(
                    f"ledger file {self.path} has schema version {version}, this fleet reads "
                    f"version {SCHEMA_VERSION}; use a fleet release that reads it, or move "
                    "the file away to start an empty ledger"
                )
            return
        if tables:
            raise StorageError(
                f"ledger file {self.path} is not a fleet ledger (tables "
                f"{sorted(tables)}, no schema version)"
            )
        db.execute("BEGIN")
        for stmt in _SCHEMA:
            db.execute(stmt)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        db.execute("COMMIT")

    def _migrate(self, version: str) -> None:
        """Bring a file of an older schema version to this one, in one transaction."""
        with self._transaction() as db:
            for stmt in _MIGRATIONS[version]:
                db.execute(stmt)
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION),),
            )

    def _load_index(self) -> tuple[HashIndex, int, int]:
        """One scan of (h, seq): the in-memory index, the next sequence number, count.

        Read in chunks straight into numpy arrays, so the scan's peak memory stays a
        small multiple of the index's (Python lists of 1M ints would cost ~150 MiB)."""
        cur = self._db.execute("SELECT h, seq FROM outcomes")
        key_parts: list[np.ndarray] = []
        seq_parts: list[np.ndarray] = []
        while rows := cur.fetchmany(65_536):
            chunk = np.array(rows, dtype=np.int64)
            key_parts.append(chunk[:, 0].copy())
            seq_parts.append(chunk[:, 1].copy())
            del chunk, rows
        keys = np.concatenate(key_parts) if key_parts else np.empty(0, dtype=np.int64)
        seq_arr = np.concatenate(seq_parts) if seq_parts else np.empty(0, dtype=np.int64)
        del key_parts, seq_parts
        last = int(seq_arr.max()) if len(seq_arr) else 0
        return HashIndex(keys, seq_arr), last + 1, len(seq_arr)

    # -- lookups -------------------------------------------------------------------------
    def _rows(self, seqs: Iterable[int], cols: str) -> dict[int, tuple[Any, ...]]:
        seqs = list(seqs)
        out: dict[int, tuple[Any, ...]] = {}
        for k in range(0, len(seqs), _SQL_VARS):
            chunk = seqs[k : k + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                f"SELECT seq, tenant, {cols} FROM outcomes WHERE seq IN ({marks})", chunk
            ):
                out[row[0]] = row[1:]
        return out

    def _find(
        self, ids: Sequence[str], tenant: str, cols: str, hashes: Sequence[int] | None = None
    ) -> list[tuple[int, tuple[Any, ...]] | None]:
        """Per id: (seq, row of ``cols`` starting with id) if recorded, else None."""
        if hashes is None:
            hashes = [key_hash(tenant, i) for i in ids]
        cands = self._index.lookup(hashes)
        wanted = {s for c in cands for s in c}
        if not wanted:
            return [None] * len(ids)
        rows = self._rows(wanted, cols)
        out: list[tuple[int, tuple[Any, ...]] | None] = []
        for i, c in zip(ids, cands):
            found = None
            for s in c:
                row = rows.get(s)
                if row is not None and row[0] == tenant and row[1] == i:
                    found = (s, row[1:])
                    break
            out.append(found)
        return out

    def get(self, ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[Outcome | None]:
        return [
            None if f is None else _outcome(f[1])
            for f in self._find(ids, tenant, _OUTCOME_COLS)
        ]

    def missing(self, ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        recent = self._recent
        if not recent:
            return [i for i, f in zip(ids, self._find(ids, tenant, "id")) if f is None]
        rest = [i for i in ids if (tenant, i) not in recent]
        if not rest:
            return []
        return [i for i, f in zip(rest, self._find(rest, tenant, "id")) if f is None]

    def duplicates(
        self, ids: Sequence[str] | None = None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, int]:
        if ids is None:
            return dict(
                self._db.execute(
                    "SELECT id, duplicates FROM outcomes WHERE duplicates > 0"
                ).fetchall()
            )
        return {
            i: f[1][1]
            for i, f in zip(ids, self._find(ids, tenant, "id, duplicates"))
            if f is not None and f[1][1]
        }

    def rows(
        self, ids: Sequence[str], cols: str, tenant: str = DEFAULT_TENANT
    ) -> list[tuple[Any, ...] | None]:
        """Per id, its row's ``cols`` (after the id) if recorded, else None: one read
        for summaries that need a few columns of many outcomes."""
        return [
            None if f is None else f[1][1:] for f in self._find(ids, tenant, f"id, {cols}")
        ]

    def owned(
        self, owner: str | None, before: int | None, limit: int, ok: bool | None = None
    ) -> list[tuple[int, Outcome]]:
        args: list[Any] = [MAX_SEQ if before is None else before]
        if owner is None:  # by the primary key
            where = "seq < ?"
        else:
            where = "owner = ? AND owner IS NOT NULL AND seq < ?"
            args.insert(0, owner)
        if ok is not None:
            where += " AND ok = ?"
            args.append(int(ok))
        index = "" if owner is None else " INDEXED BY outcomes_owner"
        rows = self._db.execute(
            f"SELECT seq, {_OUTCOME_COLS} FROM outcomes{index}"
            f" WHERE {where} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [(r[0], _outcome(r[1:])) for r in rows]

    def since(self, cursor: int, limit: int = SINCE_LIMIT) -> tuple[list[str], int]:
        rows = self._db.execute(
            "SELECT seq, id FROM outcomes WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, limit)
        ).fetchall()
        if not rows:
            return [], cursor
        return [r[1] for r in rows], rows[-1][0]

    def cursor(self) -> int:
        return self._next_seq - 1

    def count(self) -> int:
        return self._count

    # -- writes -----------------------------------------------------------------------------
    def record(
        self,
        outcomes: Sequence[Outcome],
        tenant: str = DEFAULT_TENANT,
        excused: Sequence[int] | None = None,
    ) -> int:
        if not outcomes:
            return 0
        ids = [o.task_id for o in outcomes]
        hashes = [key_hash(tenant, i) for i in ids]
        found = self._find(ids, tenant, _OUTCOME_COLS, hashes)
        inserts: list[tuple[Any, ...]] = []
        new_keys: list[tuple[int, int]] = []
        # (1 if the same delivery ran again else 0, floor from its delivery number, seq)
        dup_rows: list[tuple[int, int, int]] = []
        fresh: dict[str, tuple[int, int]] = {}  # ids first seen in this call -> (seq, d)
        seq = self._next_seq
        for k, (o, f, h) in enumerate(zip(outcomes, found, hashes)):
            exc = excused[k] if excused is not None else 0
            if f is not None:
                old = _outcome(f[1])
                if not is_replay(old, o):
                    dup_rows.append(
                        (
                            int(o.deliveries == old.deliveries),
                            beyond_first(o.deliveries, exc),
                            f[0],
                        )
                    )
                continue
            if o.task_id in fresh:  # twice in one call: the first wins
                first_seq, first_d = fresh[o.task_id]
                dup_rows.append(
                    (int(o.deliveries == first_d), beyond_first(o.deliveries, exc), first_seq)
                )
                continue
            fresh[o.task_id] = (seq, o.deliveries)
            new_keys.append((h, seq))
            inserts.append(
                (
                    seq,
                    h,
                    tenant,
                    *o[:14],
                    o.payload_hash,
                    o.degraded,
                    beyond_first(o.deliveries, exc),
                    tenant_of_id(o.task_id),
                )
            )
            seq += 1
        with self._transaction() as db:
            if inserts:
                db.executemany(_INSERT, inserts)
            if dup_rows:  # duplicates_after, in SQL
                db.executemany(
                    "UPDATE outcomes SET duplicates = MAX(duplicates + ?, ?) WHERE seq = ?",
                    dup_rows,
                )
        # Only what is committed enters the index.
        self._next_seq = seq
        self._count += len(inserts)
        for h, s in new_keys:
            self._index.add(h, s)
        self._recent.update((tenant, i) for i in fresh)
        return len(inserts)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failure (disk full, I/O) rolls back and raises the
        ``StorageError`` naming this file, leaving everything committed before intact."""
        db = self._db
        try:
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise storage_error(self.path, exc) from None

    def expire(self, before_unix_s: float) -> int:
        """Delete outcomes finished before ``before_unix_s`` (never the newest row, so
        sequence numbers, and with them readers' cursors, never go back)."""
        with self._transaction() as db:
            n = db.execute(
                "DELETE FROM outcomes WHERE finished_unix_s < ? AND seq < ?",
                (before_unix_s, self._next_seq - 1),
            ).rowcount
        if n:
            self._index, _, self._count = self._load_index()
            self._recent.clear()  # some may be gone; the index answers for the rest
        return n

    # -- summaries --------------------------------------------------------------------------
    def scan(self, cols: str) -> Iterable[tuple[Any, ...]]:
        """Every row's ``cols`` (streamed), for whole-ledger summaries."""
        return self._db.execute(f"SELECT {cols} FROM outcomes")

    def index_bytes(self) -> int:
        return self._index.nbytes

    def close(self) -> None:
        self._db.close()


def ledger_path(directory: Path, index: int) -> Path:
    """The file of ledger shard ``index`` in a fleet's directory."""
    return directory / f"ledger-{index}.sqlite3"
