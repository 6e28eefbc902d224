"""The lease queue over each storage backend (the same tests for memory and SQLite)."""

from __future__ import annotations

import pytest

from fleet.policy.bulkhead import ShardBulkhead
from fleet.queue.lease_queue import LeaseQueue, QueueFull
from fleet.queue.storage import MemoryStorage, SqliteStorage, make_storage, shard_path
from fleet.spec.queues import Discipline, StorageSpec
from fleet.task import Item
from tests.queue.helpers import item

T0 = 1_700_000_000.0


def test_put_lease_ack_round_trip(storage_factory):
    q = LeaseQueue(10, storage=storage_factory())
    assert q.put([item(i, T0 + i) for i in range(3)]) == 3
    got = q.lease(2, "h1", 30.0, now=0.0)
    assert [g.id for g in got] == ["0", "1"] and all(g.deliveries == 1 for g in got)
    assert q.depth == 1 and len(q) == 3
    assert q.ack(["0", "1", "nope"]) == 2
    assert q.pending_ids() == ["2"]


def test_full_queue_accepts_nothing_and_duplicates_are_ignored(storage_factory):
    q = LeaseQueue(3, storage=storage_factory())
    assert q.put([item("a"), item("b"), item("a")]) == 2  # "a" twice in one batch
    with pytest.raises(QueueFull, match="2 pending of at most 3"):
        q.put([item("c"), item("d")])
    assert sorted(q.pending_ids()) == ["a", "b"]  # all or nothing
    assert q.put([item("b"), item("c")]) == 1 and q.room == 0
    assert q.stats(T0).duplicates_total == 2


def test_expired_and_released_leases_are_redelivered_first(storage_factory):
    q = LeaseQueue(10, storage=storage_factory())
    q.put([item(i, T0 + i) for i in range(4)])
    q.lease(1, "h1", 5.0, now=0.0)  # "0" until t=5
    q.lease(1, "h2", 50.0, now=0.0)  # "1" until t=50
    assert q.expire(4.9) == [] and q.expire(5.0) == []
    assert q.lease(1, "h3", 5.0, now=5.0)[0].id == "0"  # redelivered before "2"
    assert q.release_holder("h2") == []
    assert q.lease(1, "h3", 5.0, now=5.0)[0].id == "1"
    st = q.stats(T0)
    assert (st.expired_total, st.redelivered_total, st.dequeued_total) == (1, 2, 4)


def test_extend_keeps_a_lease_alive(storage_factory):
    q = LeaseQueue(10, storage=storage_factory())
    q.put([item("a")])
    q.lease(1, "h", 5.0, now=0.0)
    assert q.extend(["a"], "other", 5.0, now=4.0) == 0  # only the holder may renew
    assert q.extend(["a"], "h", 5.0, now=4.0) == 1
    q.expire(6.0)
    assert q.depth == 0
    q.expire(9.0)
    assert q.depth == 1


def test_exhausted_items_are_returned_for_a_failed_outcome(storage_factory):
    q = LeaseQueue(10, max_deliveries=2, storage=storage_factory())
    q.put([item("a")])
    q.lease(1, "h", 1.0, 0.0)
    assert q.nack(["a"]) == []
    q.lease(1, "h", 1.0, 0.0)
    exhausted = q.expire(2.0)
    assert [i.id for i in exhausted] == ["a"] and exhausted[0].deliveries == 2
    assert len(q) == 0 and q.stats(T0).exhausted_total == 1


def test_restart_brings_back_everything_accepted_and_not_acked(storage_factory):
    q = LeaseQueue(100, storage=storage_factory())
    q.put([item(i, T0 + i) for i in range(10)])
    q.lease(4, "h", 30.0, now=0.0)  # 0..3 leased when the shard dies
    q.ack(["0", "5"])
    q.nack(["1"])  # back to ready, delivery count 1 recorded
    q.flush()
    q.close()
    q2 = LeaseQueue(100, storage=storage_factory())
    assert q2.pending_ids() == ["1", "2", "3", "4", "6", "7", "8", "9"]  # accept order
    assert q2.depth == 8  # the old leases are void: everything is ready again
    assert q2.stats(T0).recovered_total == 8
    got = {g.id: g.deliveries for g in q2.lease(8, "h2", 30.0, now=0.0)}
    assert got["1"] == 2  # its earlier delivery still counts toward max_deliveries
    q2.ack(got)
    q2.close()
    assert LeaseQueue(100, storage=storage_factory()).pending_ids() == []


def test_failed_items_stay_stored_until_acked_on_a_durable_backend(tmp_path):
    path = tmp_path / "s.sqlite3"
    q = LeaseQueue(10, Discipline.DEADLINE, storage=SqliteStorage(path))
    q.put([item("a", T0, deadline=T0 + 1), item("b", T0)])
    [_overdue] = q.fail_overdue(T0 + 2)
    assert q.stats(T0).unsettled == 1
    q.close()  # dies before the failure reached the ledger: "a" must come back
    q = LeaseQueue(10, Discipline.DEADLINE, storage=SqliteStorage(path))
    assert sorted(q.pending_ids()) == ["a", "b"]
    assert [i.id for i in q.fail_overdue(T0 + 2)] == ["a"]
    assert q.ack(["a"]) == 0  # settling a failed item is not an ack of pending work
    q.close()
    assert LeaseQueue(10, storage=SqliteStorage(path)).pending_ids() == ["b"]


def test_memory_backend_forgets_failed_items_at_once():
    s = MemoryStorage()
    q = LeaseQueue(10, max_deliveries=1, storage=s)
    q.put([item("a")])
    q.lease(1, "h", 1.0, 0.0)
    assert [i.id for i in q.nack(["a"])] == ["a"]
    assert len(s) == 0 and q.stats(T0).unsettled == 0


def test_restarted_queue_keeps_its_discipline(storage_factory):
    q = LeaseQueue(10, Discipline.PRIORITY, storage=storage_factory())
    q.put([item("low", T0, priority=1), item("high", T0 + 1, priority=9)])
    q.close()
    q2 = LeaseQueue(10, Discipline.PRIORITY, storage=storage_factory())
    assert [i.id for i in q2.lease(2, "h", 1.0, 0.0)] == ["high", "low"]


def test_stats_report_age_percentiles(storage_factory):
    q = LeaseQueue(1000, storage=storage_factory())
    q.put([item(i, T0 + i) for i in range(100)])  # ages 1..100 s at T0 + 100
    st = q.stats(T0 + 100)
    assert st.oldest_age_s == 100.0
    assert 49 <= st.age_p50_s <= 52 and 89 <= st.age_p90_s <= 92 and 98 <= st.age_p99_s <= 101
    q.ack([str(i) for i in range(50)])  # the oldest half leaves
    assert q.stats(T0 + 100).age_p99_s <= 51


def test_sqlite_storage_file_layout_and_bad_settings(tmp_path):
    p = shard_path(tmp_path, "ns/1", "support bot", 3)
    assert p == tmp_path / "ns_1" / "support_bot-3.sqlite3"
    s = make_storage(StorageSpec(backend="sqlite", directory=str(tmp_path)), "ns", "cap", 0)
    assert isinstance(s, SqliteStorage) and s.path.exists()
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    assert (
        shard_path(tmp_path, "ns", "cap", 0, "f/1")
        == tmp_path / "ns" / "f_1" / "cap-0.sqlite3"
    )
    assert StorageSpec().backend.value == "sqlite"  # durable unless told otherwise
    mem = StorageSpec(backend="memory", directory=str(tmp_path / "unused"))
    assert isinstance(make_storage(mem, "ns", "cap", 0), MemoryStorage)
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStorage(tmp_path / "x.sqlite3", synchronous="sometimes")


def test_a_failed_commit_accepts_nothing(tmp_path):
    s = SqliteStorage(tmp_path / "s.sqlite3")
    q = LeaseQueue(10, storage=s)
    q.put([item("a")])
    s._db.execute(
        "CREATE TRIGGER no_b BEFORE INSERT ON items WHEN NEW.id = 'b' "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    with pytest.raises(Exception, match="disk says no"):
        q.put([item("c"), item("b")])
    assert q.pending_ids() == ["a"] and s.count() == 1  # neither "b" nor "c"
    s._db.execute("DROP TRIGGER no_b")
    assert q.put([item("c")]) == 1 and q.ack(["a"]) == 1
    q.close()
    assert LeaseQueue(10, storage=SqliteStorage(tmp_path / "s.sqlite3")).pending_ids() == ["c"]


def test_a_stale_delivery_can_neither_requeue_nor_renew_the_current_one(storage_factory):
    """Fencing: delivery 1 expires, the item is leased again as delivery 2; a late nack
    or renewal naming delivery 1 is ignored, and the item completes once."""
    q = LeaseQueue(10, storage=storage_factory())
    q.put([item("a")])
    (d1,) = q.lease(1, "h", 5.0, now=0.0)
    q.expire(5.0)
    (d2,) = q.lease(1, "h", 5.0, now=5.0)
    assert (d1.deliveries, d2.deliveries) == (1, 2)
    assert q.nack(["a"], deliveries=[1]) == []
    assert q.depth == 0 and q.stats(T0).redelivered_total == 1  # still leased as 2
    assert q.extend(["a"], "h", 5.0, now=9.0, deliveries=[1]) == 0  # not renewed...
    assert q.extend(["a"], "h", 5.0, now=6.0, deliveries=[2]) == 1  # ...this one is
    assert q.expire(10.5) == [] and q.depth == 0  # renewed until 11, not 10
    assert q.lease(1, "h", 5.0, now=10.5) == []  # nobody else gets it meanwhile
    assert q.ack(["a"]) == 1  # an ack needs no fence: the outcome is recorded
    assert len(q) == 0 and q.stats(T0).acked_total == 1
    assert q.nack(["a"], deliveries=[2]) == [] and q.depth == 0


def test_items_of_a_crashed_host_come_back_in_halves_then_alone(storage_factory):
    """Poison isolation: after one crash a suspect goes out in batches of at most half
    its crashed group; after two, alone and one at a time; a crash that exhausts an
    item returns it."""
    q = LeaseQueue(100, max_deliveries=3, storage=storage_factory())
    q.put([item(i, T0 + i) for i in range(8)])
    first = q.lease(8, "h", 30.0, now=0.0)
    assert q.nack([it.id for it in first], [it.deliveries for it in first], crashed=True) == []
    q.put([item("fresh", T0 + 9)])
    assert q.stats(T0).suspects == 8
    halves = [q.lease(8, "h", 30.0, now=1.0) for _ in range(2)]
    assert [len(b) for b in halves] == [4, 4]  # never more than half of the 8
    assert [it.id for it in q.lease(8, "h", 30.0, now=1.0)] == ["fresh"]
    poisoned = halves[0]
    q.ack([it.id for it in halves[1]])  # the innocent half completed
    assert q.nack([it.id for it in poisoned], crashed=True) == []  # second crash
    assert q.stats(T0).isolated == 0
    q.put([item("later", T0 + 10)])
    # Ordinary work goes as usual; the isolated suspects met on the way are set aside.
    assert [it.id for it in q.lease(8, "h", 30.0, now=2.0)] == ["later"]
    (first,) = q.lease(8, "h", 30.0, now=2.0)  # one isolated suspect, alone
    assert first.id in {it.id for it in poisoned} and q.stats(T0).isolated == 4
    assert q.lease(8, "h", 30.0, now=2.0) == []  # no other one while it is out
    q.ack([first.id])
    rest = []
    for _ in range(3):
        (one,) = q.lease(8, "h", 30.0, now=3.0)
        assert q.lease(8, "h", 30.0, now=3.0) == []  # the next waits for this one
        rest.append(one)
        if len(rest) < 3:
            q.ack([one.id])
    exhausted = q.nack([rest[-1].id], crashed=True)  # third delivery, third crash
    assert [it.id for it in exhausted] == [rest[-1].id]
    assert exhausted[0].deliveries == 3 and q.stats(T0).suspects == 0
    assert sorted(q.pending_ids()) == ["fresh", "later"]  # leased, never crashed
    assert q.stats(T0).isolated == 0


def test_an_ordinary_nack_does_not_make_suspects(storage_factory):
    q = LeaseQueue(100, storage=storage_factory())
    q.put([item(i) for i in range(6)])
    got = q.lease(6, "h", 30.0, now=0.0)
    q.nack([it.id for it in got])
    assert len(q.lease(6, "h", 30.0, now=0.0)) == 6 and q.stats(T0).suspects == 0


def test_a_restarted_queue_adopts_the_holders_delivery_numbers(storage_factory):
    """Stored delivery counts lag (written lazily); the holder's own numbers win, so its
    fenced renewals still match after the restart."""
    st = storage_factory()
    q = LeaseQueue(10, storage=st)
    q.put([item("a"), item("b")])
    q.lease(2, "h", 5.0, now=0.0)
    q.expire(5.0)
    got = {it.id: it.deliveries for it in q.lease(2, "h", 5.0, now=5.0)}
    assert got == {"a": 2, "b": 2}
    q.flush()
    restarted = LeaseQueue(10, storage=st)
    assert restarted.adopt(["a", "b"], "h", 5.0, now=6.0, deliveries=[2, None]) == 2
    assert restarted.extend(["a"], "h", 5.0, now=7.0, deliveries=[2]) == 1


def test_cancel_takes_a_ready_item_out_until_acked_and_never_a_leased_one(storage_factory):
    store = storage_factory()
    q = LeaseQueue(10, storage=store)
    q.put([item("a"), item("b"), item("c")])
    assert [g.id for g in q.lease(1, "h1", 30.0, now=0.0)] == ["a"]
    assert q.cancel("a") == ("leased", q._pending["a"])  # running: it cannot be
    state, it = q.cancel("b")
    assert state == "cancelled" and it is not None and it.id == "b"
    assert q.cancel("b") == ("unknown", None) and q.cancel("zz") == ("unknown", None)
    assert q.known(["a", "b", "c", "zz"]) == [True, True, True, False]  # b: unsettled
    assert [g.id for g in q.lease(5, "h1", 30.0, now=0.0)] == ["c"]  # b is never leased
    assert q.stats(T0).cancelled_total == 1
    if store.durable:  # stored until its outcome is recorded and it is acked
        assert set(LeaseQueue(10, storage=storage_factory()).pending_ids()) == {"a", "b", "c"}
    q.ack(["b"])
    assert q.known(["b"]) == [False]
    if store.durable:
        assert "b" not in LeaseQueue(10, storage=storage_factory()).pending_ids()


def test_a_cancel_whose_record_failed_is_restored_and_runs(storage_factory):
    q = LeaseQueue(10, storage=storage_factory())
    q.put([item("a")])
    _, it = q.cancel("a")
    assert q.lease(1, "h", 30.0, now=0.0) == []
    q.restore(it)
    assert [g.id for g in q.lease(1, "h", 30.0, now=0.0)] == ["a"]
    assert q.stats(T0).cancelled_total == 0


def _tenant_item(tenant: str | None, i: int, **kw) -> Item:
    it = item(i, **kw)
    return it._replace(id=f"@{tenant}:{i}") if tenant else it


def test_a_tenant_is_refused_past_its_queued_share_and_others_are_not(storage_factory):
    q = LeaseQueue(100, storage=storage_factory(), bulkhead=ShardBulkhead(tenant=(3, None)))
    flood = [_tenant_item("a", i) for i in range(10)]
    kept, refused = q.split_bulkhead([*flood, _tenant_item("b", 0), item("untenanted")])
    assert [it.id for it in refused] == [f"@a:{i}" for i in range(3, 10)]
    q.put(kept)
    assert q.stats(0).pending_by_tenant == {"a": 3, "b": 1}  # untenanted: not counted
    # a pending id is a duplicate, never refused; an acked one frees room
    assert q.split_bulkhead([flood[0], flood[3]])[1] == [flood[3]]
    got = q.lease(1, "h", 60, 0)
    q.ack([got[0].id])
    assert q.split_bulkhead([flood[3], flood[4]]) == ([flood[3]], [flood[4]])


def test_a_tenant_at_its_in_flight_share_is_held_back_in_order(storage_factory):
    q = LeaseQueue(100, storage=storage_factory(), bulkhead=ShardBulkhead(tenant=(None, 2)))
    q.put([_tenant_item("a", i) for i in range(5)] + [_tenant_item("b", i) for i in range(2)])
    first = q.lease(10, "h", 60, 0)
    assert [it.id for it in first] == ["@a:0", "@a:1", "@b:0", "@b:1"]
    st = q.stats(0)
    assert st.parked == 3 and st.leased_by_tenant == {"a": 2, "b": 2} and st.depth == 3
    assert q.lease(10, "h", 60, 0) == []  # nothing of a's until one of its leases ends
    q.ack(["@a:0", "@a:1"])  # a has room for two again: its oldest parked ones
    assert [it.id for it in q.lease(10, "h", 60, 0)] == ["@a:2", "@a:3"]
    q.expire(1_000)  # every lease expires and is handed out again, a's two at most
    again = [it.id for it in q.lease(10, "h", 60, 1_000)]
    assert sorted(again)[2:] == ["@b:0", "@b:1"] and len(again) == 4
    assert q.stats(0).parked == 1 and q.stats(0).leased_by_tenant == {"a": 2, "b": 2}
    assert q.stats(0).peak_leased_by_tenant == {"a": 2, "b": 2}


def test_a_parked_item_that_fails_or_is_cancelled_is_not_handed_out(storage_factory):
    q = LeaseQueue(100, storage=storage_factory(), bulkhead=ShardBulkhead(tenant=(None, 1)))
    q.put([_tenant_item("a", 0), _tenant_item("a", 1, deadline=5.0), _tenant_item("a", 2)])
    assert [it.id for it in q.lease(10, "h", 60, 0, now_unix_s=1.0)] == ["@a:0"]
    assert q.cancel("@a:2")[0] == "cancelled"
    assert [it.id for it in q.fail_overdue(6.0)] == ["@a:1"]
    q.ack(["@a:0", "@a:2", "@a:1"])
    assert q.lease(10, "h", 60, 0) == [] and len(q) == 0
    assert q.stats(0).parked == 0 and q.stats(0).pending_by_tenant == {}


def test_a_pool_bulkhead_lowers_the_shards_depth_bound():
    q = LeaseQueue(100, bulkhead=ShardBulkhead(max_queued=3))
    with pytest.raises(QueueFull):
        q.put([item(i) for i in range(4)])
    assert q.max_depth == 3 and q.stats(0).pending_by_tenant == {}


def test_a_refunded_nack_does_not_count_the_delivery(storage_factory):
    q = LeaseQueue(10, max_deliveries=2, storage=storage_factory())
    q.put([item("a")])
    for _ in range(5):  # preempted again and again: never exhausted
        (got,) = q.lease(1, "h", 60, 0)
        assert got.deliveries == 1
        assert q.nack(["a"], [got.deliveries], refund=True) == []
    (got,) = q.lease(1, "h", 60, 0)
    assert q.nack(["a"], [got.deliveries]) == []  # an ordinary retry counts
    (got,) = q.lease(1, "h", 60, 0)
    assert got.deliveries == 2 and [it.id for it in q.nack(["a"])] == ["a"]  # exhausted


def test_a_preemption_is_counted_on_the_item_and_outlives_its_shard(storage_factory):
    # The count max_preemptions reads travels with the item: a restarted dispatcher
    # (or shard) sees what the one before it did.
    q = LeaseQueue(10, storage=storage_factory())
    q.put([item("a")])
    for expected in (0, 1, 2):
        (got,) = q.lease(1, "h", 60, 0)
        assert got.id == "a" and got.preemptions == expected
        q.nack(["a"], [got.deliveries], refund=True)
    (got,) = q.lease(1, "h", 60, 0)
    q.nack(["a"], [got.deliveries])  # an ordinary retry is not a preemption
    q.put([item("b")])
    q.close()
    reopened = LeaseQueue(10, storage=storage_factory())
    counts = {it.id: (it.preemptions, it.deliveries) for it in reopened.lease(2, "h", 60, 0)}
    assert counts == {"a": (3, 2), "b": (0, 1)}


def test_urgent_names_the_highest_priority_ready_past_the_cutoff():
    q = LeaseQueue(10)
    q.put([item("old-low", t=1.0, priority=1), item("old-high", t=2.0, priority=8)])
    q.put([item("new-top", t=10.0, priority=9)])
    assert q.urgent(0.5) is None  # nothing waited that long
    assert q.urgent(5.0) == 8  # the newest is not past the cutoff
    q.lease(1, "h", 60, 0)  # "old-low" (FIFO): running, not waiting
    q.lease(1, "h", 60, 0)  # "old-high"
    assert q.urgent(5.0) is None and q.urgent(10.0) == 9


def test_what_a_tenants_in_flight_share_holds_back_is_counted_by_priority():
    q = LeaseQueue(100, bulkhead=ShardBulkhead(tenant=(None, 2)))
    q.put(
        [_tenant_item("a", i, priority=9 if i < 2 else 1) for i in range(5)]
        + [_tenant_item("b", 0, priority=5), item("mine", priority=3)]
    )
    # Nothing leased: a's two highest would run, its three others wait for them.
    held = q.stats(0).held_back_by_priority
    assert held[1] == 3 and sum(held) == 3
    q.lease(10, "h", 60, 0)  # a's two 9s, b's one and the untenanted one run
    assert sum(q.stats(0).held_back_by_priority) == 3  # a's 1s: held while its 9s run
    q.ack(["@a:0"])  # one of a's slots is free: one of its 1s may run
    assert q.stats(0).held_back_by_priority[1] == 2
    assert q.stats(0).depth == 3  # still queued all the same


def test_a_queue_file_made_before_preemption_counts_loads_them_as_zero(tmp_path):
    import sqlite3

    path = tmp_path / "shard.sqlite3"
    st = SqliteStorage(path)
    st.append([item("old")])
    st.close()
    db = sqlite3.connect(path)  # what the release before wrote: no preemptions column
    db.execute("ALTER TABLE items DROP COLUMN preemptions")
    db.commit()
    db.close()
    q = LeaseQueue(10, storage=SqliteStorage(path))
    (got,) = q.lease(1, "h", 60, 0)
    assert (got.id, got.preemptions) == ("old", 0)
    q.nack(["old"], [got.deliveries], refund=True)
    q.close()
    (again,) = LeaseQueue(10, storage=SqliteStorage(path)).lease(1, "h", 60, 0)
    assert again.preemptions == 1
