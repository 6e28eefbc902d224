"""The controller's durable state (``fleet.runtime.control_store``), without Ray: the
autoscaling state and timeline survive a new store on the same file, a restored
stabilization window still holds agents on another process's clock, the timeline stays
bounded, and a file of another schema version is refused by name."""

from __future__ import annotations

import math
import sqlite3

import pytest

from fleet.policy.autoscaling import ScalingInput, ScalingState, decide
from fleet.queue.storage import StorageError
from fleet.runtime.control_store import (
    CONTROL_FILE,
    MemoryControlStore,
    PoolControl,
    SqliteControlStore,
    make_control_store,
    resume_t_s,
    state_from_ages,
    state_to_ages,
)
from fleet.spec import AutoscalingSpec
from fleet.spec.queues import StorageSpec
from tests.utils import FakeClock

SPEC = AutoscalingSpec(
    min_agents=1,
    max_agents=8,
    target_queued_per_agent=1,
    control_interval_s=1,
    upscale_within_s=0,
    downscale_within_s=0,
    downscale_stabilization_s=10,
)


@pytest.fixture(params=["memory", "sqlite"])
def reopen(request, tmp_path):
    """``reopen()`` gives the store a restarted controller would open: the same object
    for memory (it lives in the process), a new one on the same file for sqlite."""
    if request.param == "memory":
        store = MemoryControlStore()
        yield lambda: store
    else:
        opened = []

        def again():
            opened.append(SqliteControlStore(tmp_path / CONTROL_FILE))
            return opened[-1]

        yield again
        for s in opened:
            s.close()


def _tick(store, clock, agents, state, queued, pool="p"):
    d, state = decide(SPEC, ScalingInput(clock(), agents, queued), state)
    sample = {"t_s": clock() - 1_000.0, "unix_s": clock(), "pool": pool, "agents": d.agents}
    store.save(clock(), {pool: PoolControl(d.agents, state)}, [sample])
    clock.advance(SPEC.control_interval_s)
    return d.agents, state


def test_a_restored_window_holds_agents_on_another_clock(reopen):
    store, clock = reopen(), FakeClock(1_000.0)
    agents, state = SPEC.start_agents, None
    for _ in range(5):  # a burst: up to max_agents at once
        agents, state = _tick(store, clock, agents, state, queued=50)
    assert agents == 8
    for _ in range(3):  # then nothing queued: the window holds the 8
        agents, state = _tick(store, clock, agents, state, queued=0)
    assert agents == 8
    # The controller dies; its successor's monotonic clock has another origin, and the
    # downtime does not count (it observed nothing).
    restarted = FakeClock(5.0)
    snap = reopen().load(restarted())
    assert snap.pools["p"].agents == 8
    state = snap.pools["p"].state
    # The newest high sample was 3 s old at the kill: the window holds 7 s more.
    held = []
    while True:
        d, state = decide(SPEC, ScalingInput(restarted(), 8, 0), state)
        if d.agents < 8:
            break
        held.append(restarted() - 5.0)
        restarted.advance(1)
    assert held == [0, 1, 2, 3, 4, 5, 6], held
    # Without the saved state, the same decision would drop at once.
    d, _ = decide(SPEC, ScalingInput(5.0, 8, 0), ScalingState())
    assert d.agents == 1


def test_times_are_saved_as_ages_and_credit_does_not_bank_the_downtime():
    spec = AutoscalingSpec(
        min_agents=1,
        max_agents=101,
        target_queued_per_agent=1,
        control_interval_s=1,
        upscale_within_s=0,
        downscale_within_s=100,
        downscale_stabilization_s=0,
    )
    state = ScalingState(
        last_tick_s=100.0,
        last_up_s=98.0,
        last_down_s=None,
        up_credit=math.inf,
        down_credit=0.5,
        window=((99.0, 7), (100.0, 9)),
    )
    ages = state_to_ages(state, now_s=100.5)
    assert ages["window"] == [[1.5, 7], [0.5, 9]] and ages["last_down_age_s"] is None
    back = state_from_ages(ages, now_s=7.0)  # a process whose clock reads 7.0
    assert back == ScalingState(6.5, 4.5, None, math.inf, 0.5, ((5.5, 7), (6.5, 9)))
    # An hour of downtime does not become an hour of down-scale credit: the first
    # tick after the restart earns one interval's worth (1 agent/s here).
    d, _ = decide(spec, ScalingInput(7.5, 101, 0), back)
    assert d.agents == 100


def test_timeline_is_bounded_and_kept_in_order(tmp_path):
    store, clock = SqliteControlStore(tmp_path / CONTROL_FILE, max_samples=5), FakeClock(0.0)
    for k in range(4):
        store.save(
            clock(), {}, [{"t_s": 3 * k + j, "unix_s": 0.0, "pool": "p"} for j in range(3)]
        )
    store.close()
    again = SqliteControlStore(tmp_path / CONTROL_FILE, max_samples=5)
    assert [s["t_s"] for s in again.load(0.0).timeline] == [7, 8, 9, 10, 11]
    again.save(0.0, {}, [{"t_s": 12, "unix_s": 0.0, "pool": "p"}])  # numbering resumes
    assert [s["t_s"] for s in again.load(0.0).timeline] == [8, 9, 10, 11, 12]
    assert again._db.execute("SELECT COUNT(*) FROM timeline").fetchone()[0] == 5
    again.close()


def test_restart_counts_seen_and_reset(reopen):
    store = reopen()
    store.save(0.0, {"p": PoolControl(3, ScalingState())}, [], {"f.ledger": 2})
    store.save(1.0, {"p": PoolControl(4, ScalingState())}, [])  # None: counts unchanged
    snap = reopen().load(0.0)
    assert snap.restarts_seen == {"f.ledger": 2} and snap.pools["p"].agents == 4
    reopen().reset()
    snap = reopen().load(0.0)
    assert (snap.pools, snap.timeline, snap.restarts_seen) == ({}, [], {})


def test_another_schema_version_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "ns" / CONTROL_FILE
    SqliteControlStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StorageError, match=f"{path}.*schema version 99"):
        SqliteControlStore(path)


def test_a_file_that_is_not_a_database_is_refused_naming_it(tmp_path):
    path = tmp_path / CONTROL_FILE
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError, match=str(path)):
        SqliteControlStore(path)


def test_the_backend_follows_queues_storage(tmp_path):
    sqlite = make_control_store(
        StorageSpec(backend="sqlite", directory=str(tmp_path)), "ns", "f"
    )
    assert sqlite.durable and sqlite.path == tmp_path / "ns" / "f" / CONTROL_FILE
    sqlite.close()
    assert not make_control_store(StorageSpec(backend="memory"), "ns", "f").durable


def test_timeline_t_s_carries_on_over_the_downtime():
    timeline = [{"t_s": 41.5, "unix_s": 1_000.0}]
    assert resume_t_s([], 5_000.0) == 0.0
    assert resume_t_s(timeline, 1_003.0) == 44.5
    assert resume_t_s(timeline, 900.0) == 41.5  # the wall clock was set back
