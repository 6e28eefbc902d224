"""Where a queue shard keeps accepted items: one interface, an in-memory and a SQLite backend.

A ``LeaseQueue`` keeps its working state (ready order, leases) in memory and writes
through to a ``QueueStorage``: every accepted item is ``append``-ed and committed before
``put`` returns, every finished one is ``remove``-d and committed before ``ack``
returns. On start the queue ``load``-s whatever is stored: everything accepted and not
acked comes back, ready again (leases are not stored: a lease held when the process died
is void, and the item is redelivered; at-least-once, duplicates absorbed by the ledger).

Durability contract of a backend: after ``commit()`` returns, the appends and removals
made before it survive the death of the process (kill -9) and are what ``load()``
returns next time. Writes not yet committed may be lost; the queue only buffers writes
whose loss is harmless (delivery counts).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from fleet.spec.queues import StorageBackend, StorageSpec
from fleet.task import Item


class QueueStorage(Protocol):
    """Durable (or not) home of one shard's accepted items."""

    #: True when items outlive the process (the queue then keeps failed items stored
    #: until the caller acks them, i.e. until their failure is recorded).
    durable: bool

    def append(self, items: Sequence[Item]) -> None:
        """Store newly accepted items (replacing a stored item with the same id)."""

    def remove(self, ids: Iterable[str]) -> None:
        """Forget finished items. Unknown ids are ignored."""

    def set_deliveries(self, item_id: str, deliveries: int) -> None:
        """Record how often an item has been delivered (may be buffered until commit)."""

    def set_preemptions(self, item_id: str, preemptions: int) -> None:
        """Record how often an item's run was preempted (may be buffered until commit)."""

    def commit(self) -> None:
        """Make everything written so far durable."""

    def load(self) -> Iterator[Item]:
        """Every stored item, in the order it was accepted."""

    def close(self) -> None:
        """Commit and release the backend."""


class MemoryStorage:
    """Items kept in a dict: survives a new ``LeaseQueue`` in the same process, not a
    process death. Fastest; for tests and throwaway runs."""

    durable = False

    def __init__(self) -> None:
        self._items: dict[str, Item] = {}

    def __len__(self) -> int:
        return len(self._items)

    def append(self, items: Sequence[Item]) -> None:
        d = self._items
        for it in items:
            d.pop(it.id, None)  # a replaced item moves to the end: accept order
            d[it.id] = it

    def remove(self, ids: Iterable[str]) -> None:
        d = self._items
        for i in ids:
            d.pop(i, None)

    def set_deliveries(self, item_id: str, deliveries: int) -> None:
        it = self._items.get(item_id)
        if it is not None:
            self._items[item_id] = it._replace(deliveries=deliveries)

    def set_preemptions(self, item_id: str, preemptions: int) -> None:
        it = self._items.get(item_id)
        if it is not None:
            self._items[item_id] = it._replace(preemptions=preemptions)

    def commit(self) -> None:
        pass

    def load(self) -> Iterator[Item]:
        return iter(list(self._items.values()))

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    capability TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload BLOB NOT NULL,
    submitted_unix_s REAL NOT NULL,
    deadline_unix_s REAL,
    utility REAL,
    affinity_key TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    traceparent TEXT,
    degraded TEXT,
    preemptions INTEGER NOT NULL DEFAULT 0,
    cache_key TEXT
)
"""
# Columns added after a release, with their type: a file made before gets them on open
# (in its old rows NULL, the Item field's default None, or the column's own default).
_ADDED_COLUMNS = (
    ("traceparent", "TEXT"),
    ("degraded", "TEXT"),
    ("preemptions", "INTEGER NOT NULL DEFAULT 0"),
    ("cache_key", "TEXT"),
)
# The columns after ``seq`` are Item's fields, in order (rows are built with Item(*row)).
_INSERT = (
    "INSERT INTO items (seq, id, capability, priority, payload, submitted_unix_s,"
    " deadline_unix_s, utility, affinity_key, deliveries, traceparent, degraded,"
    " preemptions, cache_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE = "DELETE FROM items WHERE seq = ?"
_SET_DELIVERIES = "UPDATE items SET deliveries = ? WHERE seq = ?"
_SET_PREEMPTIONS = "UPDATE items SET preemptions = ? WHERE seq = ?"
_SELECT = (
    "SELECT seq, id, capability, priority, payload, submitted_unix_s, deadline_unix_s,"
    " utility, affinity_key, deliveries, traceparent, degraded, preemptions, cache_key"
    " FROM items ORDER BY seq"
)


class SqliteStorage:
    """Items in a SQLite file in WAL mode; one transaction per ``commit``.

    Batched commits: the queue calls ``commit`` once per ``put`` or ``ack`` call, however
    many items it carries, so the per-commit cost (a WAL append; plus an fsync with
    ``synchronous="full"``) is shared by the batch. With ``synchronous="normal"`` a
    committed transaction survives the process being killed (the WAL is in the OS page
    cache), but not a power loss; ``"full"`` survives both.

    Rows are keyed by an accept sequence number, and this object maps task id -> row.
    Measured: with a unique index on the (random) task ids instead, every batch of
    1,000 inserts or deletes touched ~1,000 random index pages, all rewritten to the WAL
    (~75 us per item at 1M items); keyed by sequence, inserts append to the end of the
    table and a FIFO drain deletes from its start. The map costs ~80 bytes per item.

    Single-threaded like the queue that owns it; one process per file.
    """

    durable = True

    def __init__(
        self, path: str | os.PathLike[str], synchronous: str = "normal", cache_mib: int = 16
    ):
        self.path = Path(path)
        self._db = open_wal(self.path, synchronous, cache_mib)  # one commit per batch
        self._db.execute(_SCHEMA)
        _add_missing_columns(self._db)
        self._rows: dict[str, int] = {}  # task id -> seq of its row (filled by load)
        self._next_seq = (
            self._db.execute("SELECT MAX(seq) FROM items").fetchone()[0] or 0
        ) + 1
        self._loaded = False
        self._inserts: list[tuple] = []
        self._deletes: list[tuple[int]] = []
        self._deliveries: dict[int, int] = {}
        self._preemptions: dict[int, int] = {}

    def append(self, items: Sequence[Item]) -> None:
        self._ensure_loaded()
        rows, seq = self._rows, self._next_seq
        for it in items:
            old = rows.get(it.id)
            if old is not None:  # replaced: the old row goes, in the same transaction
                self._deletes.append((old,))
            rows[it.id] = seq
            self._inserts.append((seq, *it))
            seq += 1
        self._next_seq = seq

    def remove(self, ids: Iterable[str]) -> None:
        rows = self._rows
        for i in ids:
            seq = rows.pop(i, None)
            if seq is not None:
                self._deletes.append((seq,))

    def set_deliveries(self, item_id: str, deliveries: int) -> None:
        seq = self._rows.get(item_id)
        if seq is not None:
            self._deliveries[seq] = deliveries

    def set_preemptions(self, item_id: str, preemptions: int) -> None:
        seq = self._rows.get(item_id)
        if seq is not None:
            self._preemptions[seq] = preemptions

    def commit(self) -> None:
        if not (self._inserts or self._deletes or self._deliveries or self._preemptions):
            return
        db = self._db
        db.execute("BEGIN")
        try:
            if self._inserts:
                db.executemany(_INSERT, self._inserts)
            if self._deliveries:
                db.executemany(
                    _SET_DELIVERIES, [(n, seq) for seq, n in self._deliveries.items()]
                )
            if self._preemptions:
                db.executemany(
                    _SET_PREEMPTIONS, [(n, seq) for seq, n in self._preemptions.items()]
                )
            if self._deletes:
                db.executemany(_DELETE, self._deletes)
            db.execute("COMMIT")
        except BaseException as exc:
            db.execute("ROLLBACK")
            # The id -> row map already counted the rolled-back writes: re-read it.
            self._rows = {i: seq for seq, i in db.execute("SELECT seq, id FROM items")}
            if isinstance(exc, (sqlite3.Error, OSError)):
                # A full disk or an I/O error: the caller (put) tells its submitter,
                # naming the file; nothing committed before is touched.
                raise storage_error(self.path, exc) from None
            raise
        finally:
            self._inserts.clear()
            self._deletes.clear()
            self._deliveries.clear()
            self._preemptions.clear()

    def _ensure_loaded(self) -> None:
        if not self._loaded:  # appending before load(): the id -> row map is needed
            for _ in self.load():
                pass

    def load(self) -> Iterator[Item]:
        self.commit()
        self._loaded = True
        rows: dict[str, int] = {}
        self._rows = rows
        # One streaming pass: the map shares each id string with the Item it yields.
        for seq, *fields in self._db.execute(_SELECT):
            item = Item(*fields)
            old = rows.get(item.id)
            if old is not None:  # not produced by append (it deletes the old row)
                self._deletes.append((old,))
            rows[item.id] = seq
            yield item

    def count(self) -> int:
        """Stored items (committed), for tests and status."""
        self.commit()
        return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()


def _add_missing_columns(db: sqlite3.Connection) -> None:
    have = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    for name, sql_type in _ADDED_COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE items ADD COLUMN {name} {sql_type}")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class StorageError(RuntimeError):
    """Durable storage cannot be used: the message names the file and the cause."""


class StorageFull(StorageError):
    """The disk holding a fleet's storage is full (ENOSPC); nothing was written."""


def open_wal(
    path: Path, synchronous: str = "normal", cache_mib: int | None = None
) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` (created, with its directory) in WAL
    mode, for one process and thread: ``isolation_level=None``, so the caller issues
    BEGIN/COMMIT itself, one transaction per batch or call. ``synchronous`` ``normal``
    survives kill -9 of the process, ``full`` also power loss."""
    if synchronous not in ("normal", "full"):
        raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous.upper()}")
    if cache_mib is not None:
        db.execute(f"PRAGMA cache_size=-{int(cache_mib) * 1024}")
    return db


def storage_error(path: str | os.PathLike[str], exc: BaseException) -> StorageError:
    """The clear error for a failed write to ``path`` (disk full, read-only, ...)."""
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno == 28) or "disk is full" in text:
        return StorageFull(
            f"storage full: {path}: no space left on device; free space "
            "on that disk (nothing was written, nothing earlier is lost)"
        )
    return StorageError(f"storage failed: {path}: {text}")


def fleet_directory(spec: StorageSpec, namespace: str, fleet: str) -> Path:
    """The directory of one fleet's files (queues, ledger, control state):
    ``<directory>/<namespace>/<fleet>/``."""
    return (
        Path(os.path.expanduser(spec.directory))
        / _UNSAFE.sub("_", namespace)
        / _UNSAFE.sub("_", fleet)
    )


def check_writable(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` and write a probe file in it, or raise StorageError naming
    the directory and the cause (checked at start-up, before anything is accepted)."""
    path = Path(directory)
    probe = path / ".fleet-write-probe"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StorageError(
            f"storage directory {path} is not writable: {exc.strerror or exc}; set "
            "queues.storage.directory to a writable directory"
        ) from None


def shard_path(
    directory: str | os.PathLike[str],
    namespace: str,
    capability: str,
    shard: int,
    fleet: str | None = None,
) -> Path:
    """The SQLite file of one shard:
    ``<directory>/<namespace>/[<fleet>/]<capability>-<shard>.sqlite3``.

    A fleet started again under the same namespace and name finds its files and resumes
    what was accepted and not finished."""
    base = Path(os.path.expanduser(directory)) / _UNSAFE.sub("_", namespace)
    if fleet is not None:
        base /= _UNSAFE.sub("_", fleet)
    return base / f"{_UNSAFE.sub('_', capability)}-{shard}.sqlite3"


def make_storage(
    spec: StorageSpec, namespace: str, capability: str, shard: int, fleet: str | None = None
) -> MemoryStorage | SqliteStorage:
    """The storage backend a queue shard should use, as the spec says."""
    if spec.backend is StorageBackend.MEMORY:
        return MemoryStorage()
    if spec.backend is StorageBackend.SQLITE:
        return SqliteStorage(
            shard_path(spec.directory, namespace, capability, shard, fleet),
            spec.sqlite_synchronous,
            spec.sqlite_cache_mib,
        )
    raise ValueError(f"unknown storage backend {spec.backend!r}")
