"""The budget actor's state survives a restart: its book over a SQLite file, on a virtual
clock, without Ray. A "restart" (or a redeploy) is a new ``BudgetBook`` on the same file;
nothing is closed first, as after a kill -9."""

from __future__ import annotations

import errno
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleet.policy.budget import Resource, from_units
from fleet.queue.storage import StorageError, StorageFull, fleet_directory
from fleet.runtime.budget_actor import BudgetBook
from fleet.runtime.budget_client import Grant
from fleet.runtime.budget_store import (
    SCHEMA_VERSION,
    BudgetDatabase,
    SqliteBudgetStore,
    budget_path,
)
from fleet.spec.budgets import DAY_S
from tests.utils import FakeClock, make_spec, pool

PRICES = {"test-model": {"input_usd_per_mtok": 3.0, "output_usd_per_mtok": 7.0}}
TASK_USD = 0.01  # the estimate: 1000 input + 1000 output tokens of test-model
DAY0 = 20_000 * DAY_S + 3_600.0  # 01:00 UTC on a virtual day


def _spec(**budgets: Any):
    return make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:PricedAgent",
            autoscaling={"min_agents": 1, "max_agents": 50},
        ),
        budgets={
            "prices": PRICES,
            "task_estimates": {
                "work": {"model": "test-model", "input_tokens": 1000, "output_tokens": 1000}
            },
            **budgets,
        },
    )


def _reserve(book: BudgetBook, agents: list[str], tenant: str | None = None) -> list[Grant]:
    return [Grant(*g) for g in book.reserve_batch([(a, "work", tenant) for a in agents])]


def _granted(grants: list[Grant]) -> list[str]:
    return [g.reservation_id for g in grants if g.reservation_id is not None]


def _durable_view(book: BudgetBook) -> dict[str, Any]:
    """What a restart must bring back exactly. Not kept: burn-rate history (it counts
    again from the restart) and membership (agents join again as they reserve)."""
    snap = book.snapshot()
    store = book.policy.store
    view = {
        k: snap[k]
        for k in (
            "day",
            "refusals",
            "overrun_usd",
            "alerts",
            "open_reservations",
            "open_reserved_usd",
            "refused_tasks",
            "expired_reservations",
            "expired_usd",
            "late_settles",
            "reserved_total",
            "settled_total",
        )
    }
    view["fleet"] = {
        k: v for k, v in snap["fleet"].items() if k not in ("burn_usd_per_h", "agents")
    }
    for scope in ("pools", "tenants"):
        view[scope] = {
            n: {k: v for k, v in row.items() if k != "burn_usd_per_h"}
            for n, row in snap[scope].items()
        }
    # Used and reserved per counter (limits are the policy's: agents' come back as
    # they join again; a counter at zero is as good as none).
    view["counters"] = {
        e: (v.used, v.reserved)
        for e, v in store.counters(store.entries()).items()
        if v.used or v.reserved
    }  # type: ignore[attr-defined]
    view["open"] = dict(book._open)
    return view


# --- where the file lives ------------------------------------------------------------


def test_the_file_is_in_the_fleets_directory_and_memory_keeps_none(tmp_path):
    spec = make_spec(
        pool("work"),
        queues={"storage": {"directory": str(tmp_path)}},
        namespace="ns",
        name="f1",
        budgets={"daily_usd": 5},
    )
    assert (
        budget_path(spec)
        == fleet_directory(spec.queues.storage, "ns", "f1") / "budget.sqlite3"
    )
    assert budget_path(_spec(daily_usd=5)) is None, "memory backend: nothing on disk"


# --- restart ---------------------------------------------------------------------------


def test_restart_recovers_spend_and_open_reservations_and_settles_each_once(tmp_path):
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    spec = _spec(
        pools={"work": {"daily_usd": 10 * TASK_USD}},
        tenants={"acme": {"daily_usd": 5 * TASK_USD}},
    )
    book = BudgetBook(spec, clock, path)
    grants = _reserve(book, ["h/0", "h/1", "h/2", "h/3"], tenant="acme")
    ids = _granted(grants)
    assert len(ids) == 4
    book.settle_batch([(ids[0], TASK_USD / 2, 1000, 0.5)])
    clock.advance(30)
    before = _durable_view(book)
    assert before["open_reservations"] == 3

    again = BudgetBook(spec, clock, path)  # the actor restarts
    assert _durable_view(again) == before
    # A settle of a reservation made before the restart counts once, then never again.
    assert again.settle_batch([(ids[1], TASK_USD, 2000, 0.0)]) == 1
    assert again.settle_batch([(ids[1], TASK_USD, 2000, 0.0)]) == 0
    assert again.snapshot()["pools"]["work"]["spend_usd"] == pytest.approx(1.5 * TASK_USD)
    # The reservations nobody settles expire and are settled at their estimate.
    clock.advance(spec.resilience.task_timeout_s + spec.budgets.reservation_grace_s)
    third = BudgetBook(spec, clock, path)
    assert third.sweep() == 2
    snap = third.snapshot()
    assert snap["open_reservations"] == 0 and snap["expired_reservations"] == 2
    assert snap["pools"]["work"]["spend_usd"] == pytest.approx(3.5 * TASK_USD)
    assert snap["tenants"]["acme"]["spend_usd"] == pytest.approx(3.5 * TASK_USD)
    assert snap["late_settles"] == 1
    assert third.settle_batch([(ids[2], 0.0, 0, 0.0)]) == 0, "expired: counted already"
    view = third.policy.counter("pool:work:usd:daily")
    assert (view.used, view.reserved) == (round(3.5 * TASK_USD * 1e6), 0)
    final = BudgetBook(spec, clock, path)
    assert _durable_view(final) == _durable_view(third)


def test_reservation_ids_are_never_reused_after_a_restart(tmp_path):
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    spec = _spec(pools={"work": {"daily_usd": 1.0}})
    first = _granted(_reserve(BudgetBook(spec, clock, path), ["h/0"] * 3))
    BudgetBook(spec, clock, path).settle_batch([(first[0], TASK_USD, 0, 0.0)])
    second = _granted(_reserve(BudgetBook(spec, clock, path), ["h/0"] * 3))
    assert not set(first) & set(second)


def test_redeploy_keeps_the_days_spend_and_a_new_utc_day_starts_from_zero(tmp_path):
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    spec = _spec(daily_usd=3 * TASK_USD)
    book = BudgetBook(spec, clock, path)
    ids = _granted(_reserve(book, ["h/0", "h/1", "h/2"]))
    assert len(ids) == 3
    book.settle_batch([(i, TASK_USD, 2000, 0.0) for i in ids])
    assert _granted(_reserve(book, ["h/0"])) == []
    clock.advance(6 * 3_600)
    redeployed = BudgetBook(spec, clock, path)  # same spec, same directory, same day
    assert redeployed.snapshot()["fleet"]["used_usd"] == pytest.approx(3 * TASK_USD)
    assert redeployed.policy.spend_usd("fleet") == pytest.approx(3 * TASK_USD)
    grants = _reserve(redeployed, ["h/0", "h/2"])
    assert _granted(grants) == [] and {g.scope for g in grants} <= {"fleet", "agent"}
    clock.t = (math.floor(clock.t / DAY_S) + 1) * DAY_S + 60  # just after UTC midnight
    next_day = BudgetBook(spec, clock, path)
    assert len(_granted(_reserve(next_day, ["h/0", "h/1", "h/2"]))) == 3
    assert next_day.policy.spend_usd("fleet") == 0
    assert next_day.snapshot()["fleet"]["reserved_usd"] == pytest.approx(3 * TASK_USD)
    # And the new day's state is what the next restart finds.
    after = BudgetBook(spec, clock, path)
    assert after.snapshot()["fleet"]["used_usd"] == 0
    assert after.snapshot()["day"] == next_day.snapshot()["day"]


def test_alerts_fired_before_a_restart_do_not_fire_again_unpolled_ones_are_delivered(tmp_path):
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    spec = _spec(pools={"work": {"daily_usd": 10 * TASK_USD}}, alert_thresholds=[0.2, 0.5])
    book = BudgetBook(spec, clock, path)
    ids = _granted(_reserve(book, ["h/0"] * 3))
    book.settle_batch([(i, TASK_USD, 2000, 0.0) for i in ids])  # 30%: the 0.2 alert
    assert [a.threshold for a in book.poll_alerts()] == [0.2]
    ids = _granted(_reserve(book, ["h/0"] * 2))
    book.settle_batch([(i, TASK_USD, 2000, 0.0) for i in ids])  # 50%: the 0.5 alert
    again = BudgetBook(spec, clock, path)  # killed before the controller polled it
    assert [a.threshold for a in again.poll_alerts()] == [0.5]
    assert any("pool:work:usd:daily" in a for a in again.snapshot()["alerts"])
    ids = _granted(_reserve(again, ["h/0"]))
    again.settle_batch([(i, TASK_USD, 2000, 0.0) for i in ids])  # 60%: nothing new
    assert again.poll_alerts() == []
    assert BudgetBook(spec, clock, path).poll_alerts() == []


def test_old_windows_leave_the_file_as_they_leave_memory(tmp_path):
    """Counters and fired alerts of windows that ended before yesterday (hourly ones
    too) are dropped on a new day, from memory and from the file."""
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    spec = _spec(tenants={"t": {"hourly_usd": 2 * TASK_USD}}, alert_thresholds=[0.5])
    book = BudgetBook(spec, clock, path)
    ids = _granted(_reserve(book, ["h/0"], tenant="t"))
    book.settle_batch([(i, TASK_USD, 2000, 0.0) for i in ids])
    db = book._db
    assert db is not None
    assert db.rows("SELECT key FROM alerts") == [("tenant:t:usd:hourly",)]
    clock.advance(2 * DAY_S)
    _reserve(book, ["h/0"])  # the first call of a day starts it
    assert db.rows("SELECT key FROM alerts") == []
    assert db.rows(
        "SELECT COUNT(*) FROM counters WHERE idx < ?", (math.floor(clock.t / DAY_S) - 1,)
    ) == [(0,)]
    assert db.rows("SELECT COUNT(*) FROM stats") == [(0,)]
    assert _durable_view(BudgetBook(spec, clock, path)) == _durable_view(book)


def test_granted_reservations_never_exceed_a_limit_across_restarts(tmp_path):
    """Agents race for a fleet budget allocated among them; the actor restarts twice
    with reservations open. What is held (estimates of open reservations, actuals of
    settled ones), granted before and after the restarts, never exceeds the budget."""
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    covered = 40  # tasks the fleet's daily budget covers
    spec = _spec(daily_usd=covered * TASK_USD, per_agent_max_usd=10 * TASK_USD)
    limit = covered * TASK_USD
    agents = [f"h{i % 3}/{i}" for i in range(12)]
    held = 0.0
    granted = 0
    book = BudgetBook(spec, clock, path)
    for round_ in range(9):
        if round_ in (3, 6):
            book = BudgetBook(spec, clock, path)  # killed with reservations open
        ids = _granted(_reserve(book, agents * 2))
        granted += len(ids)
        held += len(ids) * TASK_USD
        assert held <= limit + 1e-9
        clock.advance(5)
        # Half of each round's grants settle at half their estimate, half stay open.
        book.settle_batch([(g, TASK_USD / 2, 1000, 0.0) for g in ids[::2]])
        held -= len(ids[::2]) * TASK_USD / 2
        view = book.policy.counter("fleet:all:usd:daily")
        assert from_units(Resource.USD, view.used + view.reserved) == pytest.approx(held)
    assert granted > covered, "settled budget was given back and granted again"
    clock.advance(spec.resilience.task_timeout_s + spec.budgets.reservation_grace_s)
    book = BudgetBook(spec, clock, path)
    book.sweep()
    view = book.policy.counter("fleet:all:usd:daily")
    assert view.reserved == 0 and from_units(Resource.USD, view.used) == pytest.approx(held)


# --- the store alone ---------------------------------------------------------------------


def test_sqlite_store_commits_and_reloads_counters_and_reservations(tmp_path):
    db = BudgetDatabase(tmp_path / "b.sqlite3")
    store = SqliteBudgetStore(db)
    store.set_limits({"a": 100})
    assert store.try_reserve("r1", {("a", 0): 60, ("b", 0): 5}) is None
    assert store.try_reserve("r2", {("a", 0): 30}) is None
    store.settle("r2", {("a", 0): 20})
    store.commit()
    again = SqliteBudgetStore(BudgetDatabase(tmp_path / "b.sqlite3"))
    again.set_limits({"a": 100})  # limits belong to the policy, not the file
    assert again.counters([("a", 0), ("b", 0)]) == store.counters([("a", 0), ("b", 0)])
    assert again.counters([("a", 0)])[("a", 0)] == (100, 20, 60)
    assert again.try_reserve("r3", {("a", 0): 21}) is not None, "still 20 + 60 of 100"
    assert again.settle("r1", {("a", 0): 60, ("b", 0): 5}) == {}
    assert again.settle("r1", {("a", 0): 60}) is None


# --- failures ----------------------------------------------------------------------------


class _FullDisk:
    """A connection whose commits fail as on a full disk while ``full`` is set."""

    def __init__(self, conn: sqlite3.Connection, error: Exception):
        self._conn = conn
        self.error = error
        self.full = True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.full:
            raise self.error
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("database or disk is full"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["sqlite-full", "enospc"],
)
def test_full_disk_fails_the_call_and_keeps_what_was_committed(tmp_path, error):
    path = tmp_path / "budget.sqlite3"
    clock = FakeClock(DAY0)
    spec = _spec(pools={"work": {"daily_usd": 4 * TASK_USD}})
    book = BudgetBook(spec, clock, path)
    ids = _granted(_reserve(book, ["h/0", "h/1"]))
    committed = _durable_view(book)
    disk = book._db._db = _FullDisk(book._db._db, error)  # type: ignore[assignment]

    with pytest.raises(StorageFull, match=str(path)):
        _reserve(book, ["h/0", "h/1"])
    # Nothing of the failed call is booked, in memory or on disk.
    assert _durable_view(book) == committed
    assert _durable_view(BudgetBook(spec, clock, path)) == committed
    with pytest.raises(StorageFull, match="storage full"):
        book.settle_batch([(ids[0], TASK_USD, 2000, 0.0)])
    assert _durable_view(book) == committed, "the settle did not happen"
    clock.advance(spec.resilience.task_timeout_s + spec.budgets.reservation_grace_s)
    with pytest.raises(StorageFull):
        book.sweep()
    assert book.snapshot()["open_reservations"] == 2

    disk.full = False  # space was freed: calls work again, nothing was lost or doubled
    assert book.settle_batch([(ids[0], TASK_USD, 2000, 0.0)]) == 1
    assert book.sweep() == 1
    assert len(_granted(_reserve(book, ["h/0", "h/1"]))) == 2
    used = book.policy.counter("pool:work:usd:daily")
    assert from_units(Resource.USD, used.used) == pytest.approx(2 * TASK_USD)
    assert _durable_view(BudgetBook(spec, clock, path)) == _durable_view(book)


def test_a_file_of_another_schema_version_is_refused_naming_both(tmp_path):
    path = tmp_path / "budget.sqlite3"
    BudgetBook(_spec(daily_usd=1), FakeClock(DAY0), path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(StorageError) as exc:
        BudgetBook(_spec(daily_usd=1), FakeClock(DAY0), path)
    assert str(path) in str(exc.value)
    assert f"schema version 99, this fleet reads version {SCHEMA_VERSION}" in str(exc.value)


def test_a_file_that_is_not_a_database_is_refused_naming_it(tmp_path):
    path = Path(tmp_path / "budget.sqlite3")
    path.write_bytes(b"not a database, " * 100)
    with pytest.raises(StorageError, match=str(path)):
        BudgetBook(_spec(daily_usd=1), FakeClock(DAY0), path)
