"""A lease-based work queue: the state one queue shard owns. Pure; ``now`` is passed in.

Invariant: every accepted item is in ``_pending`` until it is acked (its outcome is
recorded) or it is returned as *exhausted* (delivered ``max_deliveries`` times without
an ack) or *overdue* (its deadline passed before it could be handed out); the caller
records those two as failed. An item in ``_pending`` is either ready or leased, never
both: ``lease`` moves ready -> leased with an expiry; ``ack`` removes; ``nack``,
``release_holder`` and ``expire`` move leased -> ready. So nothing accepted can be lost,
and an item is never handed to two holders at once.

Order: the ready items go out in the order of the queue's discipline
(``fleet.policy.disciplines``): a deque for FIFO (a redelivered item goes first), a heap
on the discipline's static key otherwise.

Fencing: every lease is a new *delivery* (``Item.deliveries`` counts them). ``nack``
and ``extend`` may name the delivery they concern, and are ignored when it is not the
item's current one: a holder whose lease expired and whose item was leased again cannot
requeue (or keep alive) the newer delivery. ``ack`` needs no fence: it is sent only
once the item's outcome is recorded, whichever delivery recorded it.

Poison isolation: a ``nack(..., crashed=True)`` says the holder's host died while it
held these items; one of them may be what killed it. Each such item becomes a
*suspect*: after its first crash it is leased only in batches of at most half the
crashed group (bisection); after its second it is *isolated*: leased alone, and one at
a time (a host that runs it runs no other isolated suspect, so the task that kills
hosts cannot take innocent suspects with it every time). An item that a crash exhausts
is returned by that ``nack``, and the caller records it as ``host_crash``. An item in
one ordinary crash costs one smaller batch; the suspicion ends when it is acked. Limits:
an item caught in two unrelated crashes is isolated all the same, and isolated items
drain one at a time per shard (ordinary work is not held up by them); and a crash
uses up a delivery, so an innocent item near ``max_deliveries`` can still fail as
``host_crash``. Suspects are kept in memory: a restarted shard forgets them, which
costs at most one more crash each.

Bulkheads: with a ``bulkhead`` (``fleet.policy.bulkhead.ShardBulkhead``, this shard's
share of the limits) the queue counts pending and leased items per tenant (the tenant
an item's id names). ``split_bulkhead`` tells which new items a tenant has no queued
room for (the caller refuses them); ``lease`` holds back (*parks*) a ready item whose
tenant has its in-flight share leased, and as the tenant's leases come back puts its
parked items back, oldest first, at the front of a FIFO queue (where its key puts it in
the others). A parked item is
still pending (and counted in ``depth``): a deadline, a cancel or a restart treat it as
ready.

Durability: with a ``storage`` (``fleet.queue.storage``) every accepted item is stored
and committed before ``put`` returns, and removed (committed) before ``ack`` returns; a
new queue on the same storage starts with every stored item ready. With a durable
storage, exhausted and overdue items stay stored until the caller acks them (after
recording their failure), so a crash between the two cannot lose them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleet.policy.bulkhead import ShardBulkhead, held_back
from fleet.policy.disciplines import DisciplinePolicy, discipline_from_spec, make_discipline
from fleet.queue._ages import SubmitTimeHistogram
from fleet.queue.storage import QueueStorage
from fleet.spec.queues import Discipline, QueueSpec
from fleet.task import MAX_PRIORITY, Item, is_idempotent_id, tenant_of_id

# How often a shard requeues expired leases and fails overdue items (``fail_overdue``):
# the queue actor's sweep, and the simulator's (``fleet.sim.overload``).
SWEEP_INTERVAL_S = 0.5
# The most pending items ``urgent`` reads per call (preemption's question, asked every
# check period of a full pool): the shard's and the simulator's (``fleet.sim.preemption``).
URGENT_SCAN = 10_000

# Rebuild the deadline heap when stale entries (items that left) outnumber live ones by
# this factor: bounds its memory by the items with deadlines actually pending.
_DEADLINE_HEAP_SLACK = 2
_DEADLINE_HEAP_MIN = 1024

_tuple_new = tuple.__new__


# ``_with_deliveries`` relies on this layout.
_DELIVERIES = Item._fields.index("deliveries")
assert _DELIVERIES == 8


def _with_deliveries(item: Item, deliveries: int) -> Item:
    # Item._replace(deliveries=...) costs ~4x more (keyword parsing, _make); this is
    # the per-item hot path of lease.
    return _tuple_new(Item, (*item[:8], deliveries, *item[9:]))


def _delivered_once_more(item: Item) -> Item:
    return _with_deliveries(item, item[8] + 1)


class QueueFull(Exception):
    """The queue is at its bound; the submitter should wait or back off."""

    def __init__(self, depth: int, max_depth: int):
        self.depth = depth
        self.max_depth = max_depth
        super().__init__(f"queue full: {depth} pending of at most {max_depth}")

    def __reduce__(self):
        # Ray re-raises an actor's exception in the caller by unpickling it; the default
        # reduce would call __init__ with the message alone.
        return (QueueFull, (self.depth, self.max_depth))


class _FifoReady:
    def __init__(self) -> None:
        self._q: deque[Item] = deque()

    def push(self, item: Item, redelivery: bool) -> None:
        # A redelivered item was accepted before anything now waiting: it goes first.
        if redelivery:
            self._q.appendleft(item)
        else:
            self._q.append(item)

    def pop(self) -> Item:
        return self._q.popleft()

    def __len__(self) -> int:
        return len(self._q)


class _KeyedReady:
    """Lowest discipline key first; ties in arrival order (the sequence number).

    Keys are static (see ``fleet.policy.disciplines``), so a redelivered item simply
    goes back to where its key puts it."""

    def __init__(self, policy: DisciplinePolicy) -> None:
        self._key = policy.key
        self._h: list[tuple] = []
        self._seq = 0

    def push(self, item: Item, redelivery: bool) -> None:
        self._seq += 1
        heapq.heappush(self._h, (*self._key(item), self._seq, item))

    def pop(self) -> Item:
        return heapq.heappop(self._h)[-1]

    def __len__(self) -> int:
        return len(self._h)


class _Tenants:
    """Per-tenant counts and parked items of a queue with a bulkhead."""

    def __init__(self, rule: ShardBulkhead) -> None:
        self.rule = rule
        self.pending: dict[str, int] = {}
        self.leased: dict[str, int] = {}
        # By priority, for the tenants with an in-flight limit: what ``held_back`` reads.
        self.pending_p: dict[str, list[int]] = {}
        self.leased_p: dict[str, list[int]] = {}
        self.peak_leased: dict[str, int] = {}  # the most leased at once, per tenant
        self.parked: dict[str, deque[Item]] = {}
        self.parked_total = 0  # times an item was held back at its tenant's limit

    @staticmethod
    def _add(counts: dict[str, int], item_id: str, by: int) -> tuple[str | None, int]:
        """Add ``by`` to the count of the item's tenant (a count of 0 is dropped);
        returns (tenant, its new count)."""
        t = tenant_of_id(item_id)
        if t is None:
            return None, 0
        n = counts.get(t, 0) + by
        if n:
            counts[t] = n
        else:
            del counts[t]
        return t, n

    def _add_p(self, counts: dict[str, list[int]], t: str | None, item: Item, by: int) -> None:
        if t is not None and self.rule.in_flight_limit(t) is not None:
            c = counts.get(t)
            if c is None:
                c = counts[t] = [0] * (MAX_PRIORITY + 1)
            c[item.priority] += by
            if by < 0 and not any(c):
                del counts[t]

    def admitted(self, item: Item) -> None:
        t, _ = self._add(self.pending, item.id, 1)
        self._add_p(self.pending_p, t, item, 1)

    def forgotten(self, item: Item) -> None:
        t, _ = self._add(self.pending, item.id, -1)
        self._add_p(self.pending_p, t, item, -1)

    def leased_one(self, item: Item) -> None:
        t, n = self._add(self.leased, item.id, 1)
        if t is not None and n > self.peak_leased.get(t, 0):
            self.peak_leased[t] = n
        self._add_p(self.leased_p, t, item, 1)

    def unleased(self, item: Item) -> None:
        t, _ = self._add(self.leased, item.id, -1)
        self._add_p(self.leased_p, t, item, -1)

    def held_back(self) -> list[int]:
        """By priority, the ready items their tenants' in-flight shares keep from
        running now (``fleet.policy.bulkhead.held_back``)."""
        zero = [0] * (MAX_PRIORITY + 1)
        ready = {
            t: [n - m for n, m in zip(pend, self.leased_p.get(t, zero))]
            for t, pend in self.pending_p.items()
        }
        return held_back(ready, self.leased, self.rule.in_flight_limit)

    def at_limit(self, item_id: str) -> bool:
        """Whether the item's tenant has its in-flight share leased."""
        t = tenant_of_id(item_id)
        if t is None:
            return False
        limit = self.rule.in_flight_limit(t)
        return limit is not None and self.leased.get(t, 0) >= limit

    def park(self, item: Item) -> bool:
        """Hold ``item`` back if its tenant has its in-flight share leased."""
        if not self.at_limit(item.id):
            return False
        self.parked.setdefault(tenant_of_id(item.id) or "", deque()).append(item)
        self.parked_total += 1
        return True

    def unpark(self, pending: dict[str, Item], leases: dict[str, Any]) -> list[Item]:
        """Parked items whose tenants have room again, oldest first, as many as the
        room (stale ones, failed or cancelled meanwhile, are dropped)."""
        out: list[Item] = []
        for t in list(self.parked):
            q = self.parked[t]
            room = (self.rule.in_flight_limit(t) or 0) - self.leased.get(t, 0)
            while q and room > 0:
                it = pending.get(q.popleft().id)
                if it is not None and it.id not in leases:
                    out.append(it)
                    room -= 1
            if not q:
                del self.parked[t]
        return out

    @property
    def parked_now(self) -> int:
        return sum(len(q) for q in self.parked.values())


def make_ready(
    discipline: Discipline, policy: DisciplinePolicy | None = None
) -> _FifoReady | _KeyedReady:
    if discipline is Discipline.FIFO:
        return _FifoReady()
    if policy is None:
        policy = make_discipline(discipline)
    if policy.discipline is not discipline:
        raise ValueError(f"policy {policy!r} is not for discipline {discipline.value}")
    return _KeyedReady(policy)


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # ready, waiting for a holder
    leased: int
    oldest_age_s: float
    enqueued_total: int
    acked_total: int
    redelivered_total: int
    expired_total: int
    exhausted_total: int
    duplicates_total: int
    dequeued_total: int = 0  # leases handed out (first deliveries and redeliveries)
    deadline_exceeded_total: int = 0
    cancelled_total: int = 0  # taken out by their submitter before they ran
    recovered_total: int = 0  # items loaded from storage when the queue started
    unsettled: int = 0  # failed items still stored, awaiting the caller's ack
    suspects: int = 0  # items whose host died while they were leased (poison isolation)
    isolated: int = 0  # suspects of two crashes or more: leased alone, one at a time
    age_p50_s: float = 0.0  # estimated (bounded-memory histogram), pending items
    age_p90_s: float = 0.0
    age_p99_s: float = 0.0
    pending_by_priority: tuple[int, ...] = ()  # ready + leased, by priority 0..9
    enqueued_by_priority: tuple[int, ...] = ()  # ever accepted, by priority 0..9
    # Bulkheads (a queue with a tenant limit): items held back at their tenant's
    # in-flight share now and ever, and each tenant's pending, leased and most leased.
    parked: int = 0
    parked_total: int = 0
    pending_by_tenant: dict[str, int] = field(default_factory=dict)
    leased_by_tenant: dict[str, int] = field(default_factory=dict)
    peak_leased_by_tenant: dict[str, int] = field(default_factory=dict)
    held_back_by_priority: tuple[int, ...] = ()  # ready, kept back by tenants' shares


class LeaseQueue:
    """Bounded queue with leases. ``max_depth`` bounds ready + leased items.

    ``discipline`` picks the order; pass ``policy`` for its parameters (aging, decay),
    else defaults apply (strict priority for PRIORITY). ``storage`` makes accepted
    items outlive this object (see the module docstring); ``from_spec`` builds both from
    a QueueSpec. ``bulkhead``: this shard's share of the bulkheads (the module
    docstring); its ``max_queued`` lowers ``max_depth``.
    """

    def __init__(
        self,
        max_depth: int,
        discipline: Discipline = Discipline.FIFO,
        max_deliveries: int = 5,
        *,
        policy: DisciplinePolicy | None = None,
        storage: QueueStorage | None = None,
        bulkhead: ShardBulkhead | None = None,
    ):
        if policy is not None:
            discipline = policy.discipline
        if bulkhead is not None and bulkhead.max_queued is not None:
            max_depth = min(max_depth, bulkhead.max_queued)
        self.max_depth = max_depth
        self._tenants = (
            _Tenants(bulkhead) if bulkhead is not None and bulkhead.limits_tenants else None
        )
        self.max_deliveries = max_deliveries
        self.discipline = discipline
        self._ready = make_ready(discipline, policy)
        self._pending: dict[str, Item] = {}  # insertion-ordered: first is the oldest
        self._leases: dict[str, tuple[str, float]] = {}  # id -> (holder, expires_at)
        self._expiry: list[tuple[float, str]] = []  # lazy heap over _leases
        self._deadlines: list[tuple[float, str]] = []  # lazy heap over pending deadlines
        self._with_deadline = 0  # pending items that have a deadline
        self._overdue: list[Item] = []  # found overdue by lease, not yet returned
        self._unsettled: set[str] = set()  # failed, still in durable storage until acked
        # Poison isolation: id -> (host crashes, largest batch); isolated suspects set
        # aside by lease, and the one isolated suspect leased (see the docstring).
        self._suspects: dict[str, tuple[int, int]] = {}
        self._isolated: deque[str] = deque()
        self._isolated_out: str | None = None
        self._ages = SubmitTimeHistogram()
        # Per priority: pending now, and ever accepted (admission control's figures).
        self._by_priority = [0] * (MAX_PRIORITY + 1)
        self._enqueued_by_priority = [0] * (MAX_PRIORITY + 1)
        self._storage = storage
        self.enqueued_total = 0
        self.acked_total = 0
        self.redelivered_total = 0
        self.expired_total = 0
        self.exhausted_total = 0
        self.duplicates_total = 0
        self.dequeued_total = 0
        self.deadline_exceeded_total = 0
        self.cancelled_total = 0
        self.recovered_total = 0
        if storage is not None:
            for it in storage.load():
                old = self._pending.get(it.id)
                if old is not None:  # a storage yielding an id twice: keep the later
                    self._forget(old)
                    self.recovered_total -= 1
                self._admit(it)
                self.recovered_total += 1

    @classmethod
    def from_spec(
        cls,
        spec: QueueSpec,
        max_deliveries: int,
        storage: QueueStorage | None = None,
        bulkhead: ShardBulkhead | None = None,
    ) -> LeaseQueue:
        """The queue a shard runs for ``spec`` (discipline with its parameters)."""
        return cls(
            spec.max_depth,
            spec.discipline,
            max_deliveries,
            policy=discipline_from_spec(spec),
            storage=storage,
            bulkhead=bulkhead,
        )

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def room(self) -> int:
        return max(0, self.max_depth - len(self._pending))

    @property
    def depth(self) -> int:
        """Items ready and waiting for a holder (pending minus leased)."""
        return len(self._pending) - len(self._leases)

    def _admit(self, it: Item) -> None:
        self._pending[it.id] = it
        self._ready.push(it, redelivery=False)
        self._ages.add(it.submitted_unix_s)
        self._by_priority[it.priority] += 1
        if self._tenants is not None:
            self._tenants.admitted(it)
        if it.deadline_unix_s is not None:
            self._with_deadline += 1
            heapq.heappush(self._deadlines, (it.deadline_unix_s, it.id))

    def _forget(self, it: Item) -> None:
        """Bookkeeping for an item that left ``_pending``."""
        if self._suspects:
            self._suspects.pop(it.id, None)
            if self._isolated_out == it.id:
                self._isolated_out = None
        self._ages.remove(it.submitted_unix_s)
        self._by_priority[it.priority] -= 1
        if self._tenants is not None:
            self._tenants.forgotten(it)
        if it.deadline_unix_s is not None:
            self._with_deadline -= 1

    def _drop_failed(self, it: Item) -> None:
        """Remove an exhausted or overdue item; the caller records its failure."""
        del self._pending[it.id]
        if self._leases.pop(it.id, None) is not None and self._tenants is not None:
            self._tenants.unleased(it)
        self._forget(it)
        if self._storage is not None:
            if self._storage.durable:
                self._unsettled.add(it.id)  # stays stored until the caller acks it
            else:
                self._storage.remove((it.id,))

    def put(self, items: Iterable[Item]) -> int:
        """Accept items; an id already pending is a duplicate and is ignored.

        All or nothing: raises QueueFull (accepting none) if they do not all fit.
        With a storage, the accepted items are committed before this returns.
        Returns how many were newly accepted.
        """
        items = list(items)
        fresh: dict[str, Item] = {}
        for it in items:
            if it.id not in self._pending and it.id not in fresh:
                fresh[it.id] = it
        if len(fresh) > self.room:
            raise QueueFull(len(self._pending), self.max_depth)
        if fresh and self._storage is not None:
            self._storage.append(list(fresh.values()))
            self._storage.commit()  # durable before anyone is told it was accepted
            if self._unsettled:
                self._unsettled.difference_update(fresh)  # row replaced by the new one
        enqueued = self._enqueued_by_priority
        for it in fresh.values():
            self._admit(it)
            enqueued[it.priority] += 1
        self.duplicates_total += len(items) - len(fresh)
        self.enqueued_total += len(fresh)
        return len(fresh)

    def split_bulkhead(self, items: list[Item]) -> tuple[list[Item], list[Item]]:
        """(items to put, items refused): a new item is refused when its tenant holds
        its queued share here already (counting the batch's earlier items). Items
        already pending are never refused (``put`` ignores them as duplicates)."""
        tenants = self._tenants
        if tenants is None:
            return items, []
        rule, pending = tenants.rule, self._pending
        kept: list[Item] = []
        refused: list[Item] = []
        taken: dict[str, int] = {}
        for it in items:
            t = tenant_of_id(it.id)
            limit = None if t is None else rule.queued_limit(t)
            if t is None or limit is None or it.id in pending:
                kept.append(it)
            elif tenants.pending.get(t, 0) + taken.get(t, 0) >= limit:
                refused.append(it)
            else:
                taken[t] = taken.get(t, 0) + 1
                kept.append(it)
        return kept, refused

    def conflicts(self, items: Iterable[Item]) -> list[str]:
        """Ids of ``items`` pending here with another payload, for ids that come from an
        idempotency key (``idem-``): the same key must mean the same task."""
        pending = self._pending
        return [
            it.id
            for it in items
            if is_idempotent_id(it.id)
            and (old := pending.get(it.id)) is not None
            and old.payload != it.payload
        ]

    def lease(
        self, n: int, holder: str, lease_s: float, now: float, now_unix_s: float | None = None
    ) -> list[Item]:
        """Hand out up to ``n`` ready items to ``holder`` until ``now + lease_s``.

        With ``now_unix_s`` (wall clock, the time base of deadlines), overdue items met
        on the way are not handed out; they are removed and returned by the next
        ``fail_overdue``.
        """
        out: list[Item] = []
        expires = now + lease_s
        pending, leases, pop = self._pending, self._leases, self._ready.pop
        suspects = self._suspects
        tenants = self._tenants
        if tenants is not None and tenants.parked:
            # Oldest first: pushed back in reverse, a FIFO queue gets them at its front.
            for it in reversed(tenants.unpark(pending, leases)):
                self._ready.push(it, redelivery=True)
        if suspects and self._isolated and self._isolated_out is None:
            while self._isolated:  # this lease hands out one isolated suspect, alone
                i = self._isolated.popleft()
                item = pending.get(i)
                if item is not None and i not in leases:
                    if tenants is not None and tenants.park(item):
                        continue  # its tenant is at its share; it comes back unparked
                    self._isolated_out = i
                    self.dequeued_total += 1
                    return [self._lease_one(item, holder, expires)]
        while len(out) < n:
            try:
                popped = pop()
            except IndexError:  # nothing ready
                break
            item = pending.get(popped.id)
            if item is None or popped.id in leases:
                continue  # acked or re-leased since it was pushed: a stale entry
            if suspects and (s := suspects.get(item.id)) is not None:
                if s[0] >= 2:
                    self._isolated.append(item.id)  # goes out alone, in its turn
                    continue
                if len(out) >= s[1]:  # this batch is already as large as it may go in
                    self._ready.push(item, redelivery=True)
                    break
                n = min(n, s[1])
            if (
                now_unix_s is not None
                and item.deadline_unix_s is not None
                and item.deadline_unix_s <= now_unix_s
            ):
                self._drop_failed(item)
                self.deadline_exceeded_total += 1
                self._overdue.append(item)
                continue
            if tenants is not None and tenants.park(item):
                continue  # its tenant has its in-flight share: held back
            out.append(self._lease_one(item, holder, expires))
        self.dequeued_total += len(out)
        return out

    def _lease_one(self, item: Item, holder: str, expires: float) -> Item:
        item = _delivered_once_more(item)
        self._pending[item.id] = item
        self._leases[item.id] = (holder, expires)
        heapq.heappush(self._expiry, (expires, item.id))
        if self._tenants is not None:
            self._tenants.leased_one(item)
        return item

    def ack(self, ids: Iterable[str]) -> int:
        """Remove finished items (their outcome is recorded). Unknown ids are ignored.

        Also settles exhausted/overdue items returned earlier (removes them from durable
        storage); those do not count in the return value. With a storage, the removal
        is committed before this returns.
        """
        n = 0
        removed: list[str] = []
        pending, leases = self._pending, self._leases
        for i in ids:
            it = pending.pop(i, None)
            if it is not None:
                if leases.pop(i, None) is not None and self._tenants is not None:
                    self._tenants.unleased(it)
                self._forget(it)
                removed.append(i)
                n += 1
            elif i in self._unsettled:
                self._unsettled.discard(i)
                removed.append(i)
        if removed and self._storage is not None:
            self._storage.remove(removed)
            self._storage.commit()
        self.acked_total += n
        return n

    def cancel(self, item_id: str) -> tuple[str, Item | None]:
        """Take a ready item out before it runs: ``("cancelled", item)``; the caller
        records its outcome, then acks it (with a durable storage it stays stored until
        then, so a crash in between cannot lose it; ``restore`` puts it back when the
        record fails). ``("leased", item)``: it is running and cannot be cancelled;
        ``("unknown", None)``: not pending here."""
        it = self._pending.get(item_id)
        if it is None:
            return "unknown", None
        if item_id in self._leases:
            return "leased", it
        self._drop_failed(it)
        self._unsettled.add(item_id)  # known (and, with a storage, stored) until acked
        self.cancelled_total += 1
        return "cancelled", it

    def restore(self, item: Item) -> None:
        """Put back an item ``cancel`` took out whose outcome could not be recorded."""
        self._unsettled.discard(item.id)
        if item.id not in self._pending:
            self._admit(item)
            self.cancelled_total -= 1

    def known(self, ids: Iterable[str]) -> list[bool]:
        """For each id, whether it is pending here (ready, leased, or failed and not yet
        settled)."""
        pending, unsettled = self._pending, self._unsettled
        return [i in pending or i in unsettled for i in ids]

    def _fenced(
        self, ids: Iterable[str], deliveries: Iterable[int | None] | None
    ) -> Iterable[str]:
        """The ids whose current delivery is the one named (a None names none: any)."""
        if deliveries is None:
            return ids
        pending = self._pending
        return [
            i
            for i, d in zip(ids, deliveries)
            if d is None or ((it := pending.get(i)) is not None and it.deliveries == d)
        ]

    def extend(
        self,
        ids: Iterable[str],
        holder: str,
        lease_s: float,
        now: float,
        deliveries: Iterable[int | None] | None = None,
    ) -> int:
        """Renew leases still held by ``holder`` (and, with ``deliveries``, only for
        the delivery named for each id); returns how many were renewed."""
        n = 0
        expires = now + lease_s
        for i in self._fenced(ids, deliveries):
            lease = self._leases.get(i)
            if lease is not None and lease[0] == holder:
                self._leases[i] = (holder, expires)
                heapq.heappush(self._expiry, (expires, i))
                n += 1
        return n

    def _requeue(self, i: str, refund: bool = False) -> Item | None:
        """Leased -> ready; returns the item if it is exhausted (and removes it).
        ``refund``: the delivery does not count (a preempted run)."""
        if self._leases.pop(i, None) is None:
            return None
        item = self._pending[i]
        if self._tenants is not None:
            self._tenants.unleased(item)
        if self._isolated_out == i:
            self._isolated_out = None
        if refund:  # preempted: the run does not count, the preemption does
            item = self._pending[i] = item._replace(
                deliveries=max(0, item.deliveries - 1), preemptions=item.preemptions + 1
            )
            if self._storage is not None:
                self._storage.set_preemptions(i, item.preemptions)
        if item.deliveries >= self.max_deliveries:
            self._drop_failed(item)
            self.exhausted_total += 1
            return item
        self._ready.push(item, redelivery=True)
        if item.deadline_unix_s is not None:  # its deadline entry may have been dropped
            heapq.heappush(self._deadlines, (item.deadline_unix_s, i))
        if self._storage is not None:
            self._storage.set_deliveries(i, item.deliveries)  # buffered: loss is harmless
        self.redelivered_total += 1
        return None

    def nack(
        self,
        ids: Iterable[str],
        deliveries: Iterable[int | None] | None = None,
        crashed: bool = False,
        refund: bool = False,
    ) -> list[Item]:
        """Give leased items back for redelivery (their holder could not finish them).
        ``refund``: their deliveries do not count (they were preempted: cancelled to
        make room, through no fault of theirs).

        ``deliveries`` fences the call (see the module docstring): an id whose current
        delivery is not the one named is left alone. ``crashed``: the holder's host died
        with these items; they become suspects (bisection, see the module docstring).

        Returns the items that have now been delivered ``max_deliveries`` times: they
        are removed and the caller must record them as failed (and then ack them), as
        ``host_crash`` when ``crashed``.
        """
        ids = [i for i in self._fenced(ids, deliveries) if i in self._leases]
        if crashed:
            half = max(1, -(-len(ids) // 2))
            for i in ids:
                crashes = self._suspects.get(i, (0, 0))[0] + 1
                self._suspects[i] = (crashes, 1 if crashes >= 2 else half)
        exhausted = [it for i in ids if (it := self._requeue(i, refund)) is not None]
        if refund and ids and self._storage is not None:
            self._storage.commit()  # preemption counts outlive this process (rare: cheap)
        return exhausted

    def urgent(self, cutoff_unix_s: float, scan: int = URGENT_SCAN) -> int | None:
        """The highest priority among ready items submitted by ``cutoff_unix_s`` (None:
        none). Preemption's question: has an item waited too long? Pending items are
        kept oldest first, so this reads only those submitted by the cutoff, at most
        ``scan`` of them."""
        best = None
        leases, tenants = self._leases, self._tenants
        for k, it in enumerate(self._pending.values()):
            if it.submitted_unix_s > cutoff_unix_s or k >= scan:
                break
            if it.id in leases or (best is not None and it.priority <= best):
                continue
            if tenants is not None and tenants.at_limit(it.id):
                continue  # held back by its tenant's bulkhead: a free slot would not help
            best = it.priority
        return best

    def leased_to(self, holder: str) -> list[str]:
        """Ids leased to ``holder`` (a restarted holder adopts them)."""
        return [i for i, (h, _) in self._leases.items() if h == holder]

    def adopt(
        self,
        ids: Iterable[str],
        holder: str,
        lease_s: float,
        now: float,
        deliveries: Iterable[int | None] | None = None,
    ) -> int:
        """Lease ready items to ``holder`` as they are, without handing them out.

        For a queue restarted from storage: what its holder still runs comes back
        leased to that holder instead of ready, so it is not delivered a second time
        while it runs. Each adopted item counts one more delivery (the one it is in),
        or, when the holder names it in ``deliveries``, that delivery if it is later
        (stored delivery counts may lag: they are written lazily), so the holder's
        fenced renewals and nacks still match. Unknown, leased or failed ids are
        ignored; returns how many were adopted.
        """
        n = 0
        expires = now + lease_s
        pending, leases = self._pending, self._leases
        named = list(deliveries) if deliveries is not None else None
        for k, i in enumerate(ids):
            item = pending.get(i)
            if item is None or i in leases:
                continue
            item = self._lease_one(item, holder, expires)  # its ready entry is now stale
            d = named[k] if named is not None else None
            if d is not None and d > item.deliveries:
                pending[i] = _with_deliveries(item, d)
            n += 1
        return n

    def release_holder(self, holder: str) -> list[Item]:
        """Requeue everything ``holder`` has leased (it died or is draining)."""
        ids = [i for i, (h, _) in self._leases.items() if h == holder]
        return self.nack(ids)

    def expire(self, now: float) -> list[Item]:
        """Requeue leases that expired by ``now``; returns exhausted items as ``nack``."""
        exhausted = []
        while self._expiry and self._expiry[0][0] <= now:
            expires, i = heapq.heappop(self._expiry)
            lease = self._leases.get(i)
            if lease is None or lease[1] != expires:
                continue  # acked, or renewed with a later expiry
            self.expired_total += 1
            it = self._requeue(i)
            if it is not None:
                exhausted.append(it)
        return exhausted

    def fail_overdue(self, now_unix_s: float) -> list[Item]:
        """Remove and return ready items whose deadline passed by ``now_unix_s``.

        The caller records each as failed with reason ``deadline_exceeded``
        (``fleet.policy.disciplines.overdue_outcome``), then acks it. Leased items are
        left to their holder; if they come back unfinished, a later call catches them.
        Includes the overdue items ``lease`` set aside.
        """
        out, self._overdue = self._overdue, []
        h = self._deadlines
        while h and h[0][0] <= now_unix_s:
            deadline, i = heapq.heappop(h)
            it = self._pending.get(i)
            if it is None or it.deadline_unix_s != deadline or i in self._leases:
                continue  # gone, replaced, or leased (re-armed if it is requeued)
            self._drop_failed(it)
            self.deadline_exceeded_total += 1
            out.append(it)
        if len(h) > _DEADLINE_HEAP_MIN + _DEADLINE_HEAP_SLACK * self._with_deadline:
            self._deadlines = [
                (it.deadline_unix_s, i)
                for i, it in self._pending.items()
                if it.deadline_unix_s is not None
            ]
            heapq.heapify(self._deadlines)
        return out

    def flush(self) -> None:
        """Commit buffered storage writes (delivery counts); call it now and then."""
        if self._storage is not None:
            self._storage.commit()

    def close(self) -> None:
        """Commit and close the storage (the queue must not be used afterwards)."""
        if self._storage is not None:
            self._storage.close()

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def stats(self, now_unix_s: float) -> QueueStats:
        oldest = next(iter(self._pending.values()), None)
        p50, p90, p99 = self._ages.age_quantiles(now_unix_s, (0.5, 0.9, 0.99))
        return QueueStats(
            depth=len(self._pending) - len(self._leases),
            leased=len(self._leases),
            oldest_age_s=max(0.0, now_unix_s - oldest.submitted_unix_s) if oldest else 0.0,
            enqueued_total=self.enqueued_total,
            acked_total=self.acked_total,
            redelivered_total=self.redelivered_total,
            expired_total=self.expired_total,
            exhausted_total=self.exhausted_total,
            duplicates_total=self.duplicates_total,
            dequeued_total=self.dequeued_total,
            deadline_exceeded_total=self.deadline_exceeded_total,
            cancelled_total=self.cancelled_total,
            recovered_total=self.recovered_total,
            unsettled=len(self._unsettled),
            suspects=len(self._suspects),
            isolated=len(self._isolated) + (self._isolated_out is not None),
            age_p50_s=p50,
            age_p90_s=p90,
            age_p99_s=p99,
            pending_by_priority=tuple(self._by_priority),
            enqueued_by_priority=tuple(self._enqueued_by_priority),
            **self._tenant_stats(),
        )

    def _tenant_stats(self) -> dict[str, Any]:
        t = self._tenants
        if t is None:
            return {}
        return {
            "parked": t.parked_now,
            "parked_total": t.parked_total,
            "pending_by_tenant": dict(t.pending),
            "leased_by_tenant": dict(t.leased),
            "peak_leased_by_tenant": dict(t.peak_leased),
            "held_back_by_priority": tuple(t.held_back()),
        }
