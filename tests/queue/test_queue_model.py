"""Model-based test of the lease queue: random put/lease/ack/nack/extend/expire/
deadline/restart sequences over every discipline and both storage backends.

The model tracks where every accepted id is (ready, leased to whom, acked, failed). After
every step: no accepted item is lost, none is pending twice, none is leased to two
holders, and what the queue holds matches the model exactly. For keyed disciplines, each
lease hands out items no later in the discipline's order than anything left ready.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fleet.policy.disciplines import make_discipline
from fleet.queue.lease_queue import LeaseQueue
from fleet.queue.storage import MemoryStorage, SqliteStorage
from fleet.spec.queues import Discipline
from tests.queue.helpers import item

T0 = 1_700_000_000.0
LEASE_S = 10.0


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-q-"))
        self.next_id = 0
        self.now = 0.0  # monotonic base of leases
        self.accepted: dict[str, object] = {}
        self.ready: set[str] = set()
        self.leased: dict[str, tuple[str, float]] = {}  # id -> (holder, expires)
        self.acked: set[str] = set()
        self.failed: set[str] = set()  # returned as exhausted/overdue
        self.unsettled: set[str] = set()  # failed, not yet acked back (durable only)

    def teardown(self) -> None:
        self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def unix(self) -> float:
        return T0 + self.now

    def _open(self) -> None:
        storage = self.mem if self.backend == "memory" else SqliteStorage(self.dir / "q.db")
        self.q = LeaseQueue(
            self.max_depth,
            max_deliveries=self.max_deliveries,
            policy=self.policy,
            storage=storage,
        )

    @initialize(
        discipline=st.sampled_from(list(Discipline)),
        backend=st.sampled_from(["memory", "sqlite"]),
        max_deliveries=st.integers(1, 3),
        max_depth=st.integers(5, 40),
    )
    def setup(self, discipline, backend, max_deliveries, max_depth):
        self.policy = make_discipline(
            discipline, priority_aging_limit_s=30.0, utility_decay_per_s=0.5
        )
        self.backend = backend
        self.mem = MemoryStorage()
        self.max_deliveries = max_deliveries
        self.max_depth = max_depth
        self._open()

    # --- rules -----------------------------------------------------------------

    @rule(
        specs=st.lists(
            st.tuples(
                st.integers(0, 9),
                st.none() | st.floats(0.5, 60),
                st.none() | st.integers(-5, 50),
            ),
            min_size=1,
            max_size=8,
        ),
        dup=st.booleans(),
    )
    def put(self, specs, dup):
        new = []
        for prio, dl, util in specs:
            new.append(
                item(
                    f"i{self.next_id}",
                    self.unix,
                    prio,
                    None if dl is None else self.unix + dl,
                    None if util is None else float(util),
                )
            )
            self.next_id += 1
        live = sorted(self.ready | set(self.leased))
        batch = new + ([item(live[0])] if dup and live else [])  # a pending id: ignored
        pending = len(self.ready) + len(self.leased)
        fresh = [i for i in batch if i.id not in self.ready and i.id not in self.leased]
        if pending + len({i.id for i in fresh}) > self.max_depth:
            try:
                self.q.put(batch)
            except Exception as exc:
                assert type(exc).__name__ == "QueueFull"
            else:
                raise AssertionError("put beyond max_depth was accepted")
            return
        n = self.q.put(batch)
        assert n == len(new)
        for i in new:
            self.accepted[i.id] = i
            self.ready.add(i.id)

    @rule(n=st.integers(1, 6), holder=st.sampled_from(["h1", "h2", "h3"]))
    def lease(self, n, holder):
        got = self.q.lease(n, holder, LEASE_S, self.now, now_unix_s=self.unix)
        overdue = {i.id for i in self.q.fail_overdue(self.unix)}
        expect_overdue = {
            i
            for i in self.ready
            if self.accepted[i].deadline_unix_s is not None
            and self.accepted[i].deadline_unix_s <= self.unix
        }
        assert overdue == expect_overdue
        self._failed(overdue)
        self.ready -= overdue
        ids = [g.id for g in got]
        assert len(ids) == len(set(ids)) and len(ids) == min(n, len(self.ready))
        for g in got:
            assert g.id in self.ready, f"{g.id} handed out but not ready"
            assert g.deadline_unix_s is None or g.deadline_unix_s > self.unix
        self.ready -= set(ids)
        if self.policy.discipline is not Discipline.FIFO and self.ready and got:
            worst = max(self.policy.key(g) for g in got)
            best_left = min(self.policy.key(self.accepted[i]) for i in self.ready)
            assert worst <= best_left, "a later item was handed out before an earlier one"
        for i in ids:
            self.leased[i] = (holder, self.now + LEASE_S)

    def _failed(self, ids):
        self.failed |= set(ids)
        if self.backend == "sqlite":
            self.unsettled |= set(ids)

    def _requeue(self, ids, returned):
        exhausted = {i.id for i in returned}
        for i in ids:
            self.leased.pop(i)
            (self.failed if i in exhausted else self.ready).add(i)
        self._failed(exhausted)

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def ack(self, data):
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.leased)), unique=True, min_size=1)
        )
        assert self.q.ack([*ids, "unknown"]) == len(ids)
        for i in ids:
            self.leased.pop(i)
            self.acked.add(i)

    @precondition(lambda self: self.unsettled)
    @rule()
    def settle_failures(self):
        assert self.q.ack(sorted(self.unsettled)) == 0
        self.unsettled.clear()

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def nack(self, data):
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.leased)), unique=True, min_size=1)
        )
        self._requeue(ids, self.q.nack(ids))

    @rule(holder=st.sampled_from(["h1", "h2", "h3"]))
    def release_holder(self, holder):
        ids = [i for i, (h, _) in self.leased.items() if h == holder]
        self._requeue(ids, self.q.release_holder(holder))

    @precondition(lambda self: self.leased)
    @rule(holder=st.sampled_from(["h1", "h2", "h3"]))
    def extend(self, holder):
        ids = sorted(self.leased)
        mine = [i for i in ids if self.leased[i][0] == holder]
        assert self.q.extend(ids, holder, LEASE_S, self.now) == len(mine)
        for i in mine:
            self.leased[i] = (holder, self.now + LEASE_S)

    @rule(dt=st.floats(0.1, 25))
    def advance_and_expire(self, dt):
        self.now += dt
        ids = [i for i, (_, exp) in self.leased.items() if exp <= self.now]
        self._requeue(ids, self.q.expire(self.now))

    @rule()
    def restart(self):
        """The shard dies and comes back on the same storage: leases are void."""
        self.q.close()
        self._open()
        self.ready |= set(self.leased)
        self.leased.clear()
        # Failed but not settled items are still stored: they come back, to be failed
        # (or finished) again; the ledger records the first outcome.
        self.ready |= self.unsettled
        self.failed -= self.unsettled
        self.unsettled.clear()

    # --- invariants --------------------------------------------------------------

    @invariant()
    def nothing_lost_or_duplicated(self):
        if not hasattr(self, "q"):
            return
        pending = self.q.pending_ids()
        assert len(pending) == len(set(pending)), "an item is pending twice"
        assert set(pending) == self.ready | set(self.leased)
        assert self.q.depth == len(self.ready) and len(self.q) == len(pending)
        states = [self.ready, set(self.leased), self.acked, self.failed]
        assert sum(len(s) for s in states) == len(self.accepted), "an item is lost or twice"
        assert set().union(*states) == set(self.accepted)
        assert self.q.stats(self.unix).leased == len(self.leased)


QueueModel.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestQueueModel = QueueModel.TestCase
