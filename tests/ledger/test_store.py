"""The ledger's stores: first outcome wins, duplicates counted, replays ignored; the
SQLite store survives a reopen (a restart), keeps memory to its index, expires by age,
and fails clearly (full disk, unknown schema) without losing what it holds."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from fleet.ledger import store as store_mod
from fleet.ledger.store import (
    INDEX_MERGE_AT,
    HashIndex,
    MemoryLedgerStore,
    SqliteLedgerStore,
)
from fleet.queue.storage import StorageError, StorageFull
from fleet.task import Outcome


def outcome(
    i: int | str,
    *,
    agent: str = "a/0",
    started: float = 100.0,
    ok: bool = True,
    finished: float | None = None,
    output: bytes = b'{"ok":1}',
) -> Outcome:
    tid = i if isinstance(i, str) else f"t-{i}"
    return Outcome(
        tid,
        ok,
        output if ok else None,
        None if ok else "error",
        None if ok else "boom",
        agent,
        "pool",
        1,
        99.0,
        started,
        started + 1.0 if finished is None else finished,
    )


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryLedgerStore()
    else:
        s = SqliteLedgerStore(tmp_path / "ledger-0.sqlite3")
        yield s
        s.close()


def test_first_outcome_wins_later_executions_are_counted_replays_are_not(store):
    assert store.record([outcome(1), outcome(2)]) == 2
    # A second execution of t-1 (another agent): counted, not recorded.
    assert store.record([outcome(1, agent="b/3", started=200.0, ok=False)]) == 0
    # The same execution of t-2 recorded again (a retried record call): a replay.
    assert store.record([outcome(2)]) == 0
    assert store.get(["t-1", "t-2", "t-3"]) == [outcome(1), outcome(2), None]
    assert store.duplicates(["t-1", "t-2"]) == {"t-1": 1}
    assert store.duplicates() == {"t-1": 1}
    assert store.missing(["t-3", "t-1", "t-4"]) == ["t-3", "t-4"]
    assert store.count() == 2


def test_duplicates_count_executions_started_beyond_the_first(store):
    """From delivery numbers: a rerun is counted even when the run before it never
    reached the ledger; excused deliveries (retries, never started) are not."""
    d = lambda i, n, **kw: outcome(i, **kw)._replace(deliveries=n)  # noqa: E731
    # Delivery 3 recorded first: two runs before it (their host died) -> 2.
    store.record([d(1, 3), d(2, 2), d(3, 3), d(4, 1)], excused=[0, 0, 1, 0])
    assert store.duplicates(["t-1", "t-2", "t-3", "t-4"]) == {"t-1": 2, "t-2": 1, "t-3": 1}
    # Delivery 1 of t-1 reports late: already counted. t-4's delivery 1 ran twice.
    store.record([d(1, 1, agent="z/1", started=50.0), d(4, 1, agent="z/2", started=60.0)])
    assert store.duplicates(["t-1", "t-4"]) == {"t-1": 2, "t-4": 1}
    # A later delivery raises the count to what its number implies.
    store.record([d(4, 4, agent="z/3", started=70.0)])
    assert store.duplicates(["t-4"]) == {"t-4": 3}
    assert store.record([d(4, 4, agent="z/3", started=70.0)]) == 0  # a replay: no change
    assert store.duplicates(["t-4"]) == {"t-4": 3}


def test_the_same_id_twice_in_one_call_records_the_first(store):
    assert store.record([outcome(7, agent="x"), outcome(7, agent="y", started=5.0)]) == 1
    assert store.get(["t-7"])[0].agent_id == "x"
    assert store.duplicates(["t-7"]) == {"t-7": 1}


def test_since_returns_what_was_recorded_after_a_cursor_in_order(store):
    store.record([outcome(i) for i in range(5)])
    c = store.cursor()
    store.record([outcome(i) for i in range(5, 8)])
    ids, c2 = store.since(c)
    assert ids == ["t-5", "t-6", "t-7"]
    assert store.since(c2) == ([], c2)
    ids, c3 = store.since(0, limit=2)
    assert ids == ["t-0", "t-1"] and store.since(c3, limit=100)[0][0] == "t-2"


def test_expire_deletes_by_finish_time_and_never_moves_cursors_back(store):
    store.record([outcome(i, finished=10.0 + i) for i in range(10)])
    c = store.cursor()
    assert store.expire(15.0) == 5  # finished at 10..14
    assert store.missing([f"t-{i}" for i in range(10)]) == [f"t-{i}" for i in range(5)]
    assert store.count() == 5
    # Everything (the SQLite store keeps its newest row, so its sequence never resets).
    assert store.expire(1e9) == 5 - store.count() and store.count() in (0, 1)
    store.record([outcome("later")])
    ids, _ = store.since(c)
    assert ids == ["later"], "a new record gets a cursor after every earlier one"


def test_tenants_scope_ids(store):
    store.record([outcome(1)], tenant="acme")
    assert store.missing(["t-1"]) == ["t-1"]
    assert store.missing(["t-1"], tenant="acme") == []
    assert store.record([outcome(1, agent="z")]) == 1  # the same id in another tenant


def test_a_reopened_sqlite_ledger_has_every_outcome_and_continues(tmp_path):
    path = tmp_path / "ledger-0.sqlite3"
    s = SqliteLedgerStore(path)
    before = [outcome(i) for i in range(1000)]
    s.record(before[:600])
    s.record(before[600:])
    s.record([outcome(3, agent="again", started=5.0)])
    cursor = s.cursor()
    s._db.close()  # no close(): as if the process had been killed
    s2 = SqliteLedgerStore(path)
    assert s2.get([o.task_id for o in before]) == before
    assert s2.count() == 1000 and s2.duplicates() == {"t-3": 1}
    assert s2.record([outcome(5)]) == 0, "the first outcome still wins after a restart"
    s2.record([outcome("new")])
    assert s2.since(cursor) == (["new"], cursor + 1)
    s2.close()


def test_hash_collisions_cost_a_read_never_a_wrong_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "key_hash", lambda tenant, task_id: 42)
    s = SqliteLedgerStore(tmp_path / "l.sqlite3")
    assert s.record([outcome(i) for i in range(50)]) == 50
    assert s.missing(["t-1", "t-50", "t-49"]) == ["t-50"]
    assert [o.task_id for o in s.get(["t-3", "t-7"])] == ["t-3", "t-7"]
    assert s.record([outcome(3, agent="dup", started=1.0)]) == 0
    assert s.duplicates(["t-3", "t-4"]) == {"t-3": 1}
    s.close()
    s = SqliteLedgerStore(tmp_path / "l.sqlite3")  # the index rebuilt with 50 equal keys
    assert s.missing([f"t-{i}" for i in range(52)]) == ["t-50", "t-51"]
    s.close()


def test_hash_index_finds_every_entry_across_merges():
    idx = HashIndex()
    n = INDEX_MERGE_AT * 2 + 123
    for k in range(n):
        idx.add(k * 7919 % 1_000_003 - 500_000, k)
    assert len(idx) == n
    probe = [k * 7919 % 1_000_003 - 500_000 for k in (0, 1, n // 2, n - 1)] + [999_999_999]
    assert idx.lookup(probe) == [[0], [1], [n // 2], [n - 1], []]
    assert idx.nbytes == 16 * (n - n % INDEX_MERGE_AT) or idx.nbytes >= 16 * INDEX_MERGE_AT


class _FullDisk:
    """A connection that fails every write with SQLite's full-disk error while armed."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.armed = False

    def _check(self, sql: str) -> None:
        if self.armed and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        self._check(sql)
        return self._db.executemany(sql, rows)

    def close(self) -> None:
        self._db.close()


def test_a_full_disk_fails_the_record_clearly_and_loses_nothing(tmp_path):
    path = tmp_path / "ledger-0.sqlite3"
    s = SqliteLedgerStore(path)
    s.record([outcome(i) for i in range(10)])
    disk = _FullDisk(s._db)
    s._db = disk  # type: ignore[assignment]
    disk.armed = True
    with pytest.raises(StorageFull, match=r"storage full: .*ledger-0\.sqlite3"):
        s.record([outcome(i) for i in range(10, 20)])
    assert s.missing(["t-10"]) == ["t-10"], "a failed record leaves no trace in the index"
    assert s.count() == 10
    disk.armed = False
    assert s.record([outcome(i) for i in range(10, 20)]) == 10
    s.close()
    s = SqliteLedgerStore(path)
    assert s.count() == 20 and s.missing([f"t-{i}" for i in range(20)]) == []
    s.close()


def test_a_ledger_file_of_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "ledger-0.sqlite3"
    SqliteLedgerStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match=r"schema version 99.*reads version 3"):
        SqliteLedgerStore(path)
    other = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match="not a fleet ledger"):
        SqliteLedgerStore(other)


def test_owned_lists_a_tenants_outcomes_newest_first_by_cursor_and_result(store):
    a = [outcome(f"@a:{k}", ok=k % 3 != 0, finished=200.0 + k) for k in range(7)]
    store.record([outcome("@b:0"), a[0], outcome("t-1"), *a[1:4]])
    store.record([outcome("@b:1"), *a[4:]])
    page = store.owned("a", None, 3)
    assert [o.task_id for _, o in page] == ["@a:6", "@a:5", "@a:4"]
    rest = store.owned("a", page[-1][0], 10)
    assert [o.task_id for _, o in rest] == ["@a:3", "@a:2", "@a:1", "@a:0"]
    assert store.owned("a", rest[-1][0], 10) == []
    assert [o.task_id for _, o in store.owned("a", None, 10, ok=False)] == [
        "@a:6",
        "@a:3",
        "@a:0",
    ]
    assert [o.task_id for _, o in store.owned("b", None, 10, ok=True)] == ["@b:1", "@b:0"]
    assert store.owned("c", None, 10) == [] and store.owned("", None, 10) == []
    assert page[0][1] == a[6], "the whole outcome"
    everyone = [o.task_id for _, o in store.owned(None, None, 20)]
    assert everyone == [
        "@a:6",
        "@a:5",
        "@a:4",
        "@b:1",
        "@a:3",
        "@a:2",
        "@a:1",
        "t-1",
        "@a:0",
        "@b:0",
    ]
    store.expire(a[4].finished_unix_s)
    assert [o.task_id for _, o in store.owned("a", None, 10)] == ["@a:6", "@a:5", "@a:4"]
    assert store.owned("b", None, 10) == []


def test_a_ledger_file_of_schema_version_1_is_migrated_in_place(tmp_path):
    path = tmp_path / "ledger-0.sqlite3"
    s = SqliteLedgerStore(path)
    s.record([outcome("@a:x"), outcome("t-1"), outcome("@b:y:z")])
    s.close()
    db = sqlite3.connect(path)  # what version 1 wrote: no owner column, no index
    db.executescript(
        "DROP INDEX outcomes_owner; ALTER TABLE outcomes DROP COLUMN owner;"
        " ALTER TABLE outcomes DROP COLUMN degraded;"
        " UPDATE meta SET value = '1' WHERE key = 'schema_version';"
    )
    db.close()
    s = SqliteLedgerStore(path)
    assert [o.task_id for _, o in s.owned("b", None, 5)] == ["@b:y:z"]
    assert [o.task_id for _, o in s.owned("a", None, 5)] == ["@a:x"]
    assert s.count() == 3 and s.missing(["t-1", "@a:x"]) == []
    s.record([outcome("@a:w")])
    assert [o.task_id for _, o in s.owned("a", None, 5)] == ["@a:w", "@a:x"]
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta").fetchone() == ("3",)
    db.close()


def test_a_ledger_file_of_schema_version_2_gains_the_degraded_column(tmp_path):
    path = tmp_path / "ledger-0.sqlite3"
    s = SqliteLedgerStore(path)
    s.record([outcome("t-1")])
    s.close()
    db = sqlite3.connect(path)  # what version 2 wrote: no degraded column
    db.executescript(
        "ALTER TABLE outcomes DROP COLUMN degraded;"
        " UPDATE meta SET value = '2' WHERE key = 'schema_version';"
    )
    db.close()
    s = SqliteLedgerStore(path)
    assert s.get(["t-1"])[0].degraded is None
    s.record([outcome("t-2")._replace(degraded="work.error_rate >= 0.5")])
    (o,) = s.get(["t-2"])
    assert o.degraded == "work.error_rate >= 0.5"
    assert o.to_result().degraded and o.to_result().degraded_rule == o.degraded
    s.close()


def test_bounded_set_keeps_the_newest_keys():
    from fleet._bounded import BoundedSet

    s = BoundedSet(3)
    s.update(["a", "b", "a", "c", "d"])
    assert ("a" in s, "b" in s, "c" in s, "d" in s, len(s)) == (False, True, True, True, 3)
    s.clear()
    assert not s and "d" not in s
    with pytest.raises(ValueError, match="limit must be >= 1"):
        BoundedSet(0)
