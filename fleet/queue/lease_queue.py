"""A lease-based work queue: the state one queue shard owns. Pure; ``now`` is passed in.

Invariant: every accepted item is in ``_pending`` until it is acked (its outcome is
recorded) or it is returned as *exhausted* (delivered ``max_deliveries`` times without
an ack; the caller records it as failed). An item in ``_pending`` is either ready or
leased, never both: ``lease`` moves ready -> leased with an expiry; ``ack`` removes;
``nack``, ``release_holder`` and ``expire`` move leased -> ready. So nothing accepted
can be lost, and an item is never handed to two holders at once.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from fleet.spec.queues import Discipline
from fleet.task import Item


class QueueFull(Exception):
    """The queue is at its bound; the submitter should wait or back off."""

    def __init__(self, depth: int, max_depth: int):
        self.depth = depth
        self.max_depth = max_depth
        super().__init__(f"queue full: {depth} pending of at most {max_depth}")


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


class _PriorityReady:
    """Highest priority first; FIFO (by submit time) within a priority."""

    def __init__(self) -> None:
        self._h: list[tuple[int, float, int, Item]] = []
        self._seq = 0

    def push(self, item: Item, redelivery: bool) -> None:
        self._seq += 1
        heapq.heappush(self._h, (-item.priority, item.submitted_unix_s, self._seq, item))

    def pop(self) -> Item:
        return heapq.heappop(self._h)[3]

    def __len__(self) -> int:
        return len(self._h)


def make_ready(discipline: Discipline) -> _FifoReady | _PriorityReady:
    if discipline is Discipline.FIFO:
        return _FifoReady()
    if discipline is Discipline.PRIORITY:
        return _PriorityReady()
    raise ValueError(f"unknown discipline {discipline!r}")


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


class LeaseQueue:
    """Bounded queue with leases. ``max_depth`` bounds ready + leased items."""

    def __init__(self, max_depth: int, discipline: Discipline = Discipline.FIFO,
                 max_deliveries: int = 5):
        self.max_depth = max_depth
        self.max_deliveries = max_deliveries
        self._ready = make_ready(discipline)
        self._pending: dict[str, Item] = {}  # insertion-ordered: first is the oldest
        self._leases: dict[str, tuple[str, float]] = {}  # id -> (holder, expires_at)
        self._expiry: list[tuple[float, str]] = []  # lazy heap over _leases
        self.enqueued_total = 0
        self.acked_total = 0
        self.redelivered_total = 0
        self.expired_total = 0
        self.exhausted_total = 0
        self.duplicates_total = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def room(self) -> int:
        return self.max_depth - len(self._pending)

    @property
    def depth(self) -> int:
        """Items ready and waiting for a holder (pending minus leased)."""
        return len(self._pending) - len(self._leases)

    def put(self, items: Iterable[Item]) -> int:
        """Accept items; an id already pending is a duplicate and is ignored.

        All or nothing: raises QueueFull (accepting none) if they do not all fit.
        Returns how many were newly accepted.
        """
        items = list(items)
        fresh = [it for it in items if it.id not in self._pending]
        if len(fresh) > self.room:
            raise QueueFull(len(self._pending), self.max_depth)
        accepted = 0
        for it in fresh:
            if it.id in self._pending:  # duplicate id inside this same batch
                continue
            self._pending[it.id] = it
            self._ready.push(it, redelivery=False)
            accepted += 1
        self.duplicates_total += len(items) - accepted
        self.enqueued_total += accepted
        return accepted

    def lease(self, n: int, holder: str, lease_s: float, now: float) -> list[Item]:
        """Hand out up to ``n`` ready items to ``holder`` until ``now + lease_s``."""
        out: list[Item] = []
        expires = now + lease_s
        while len(out) < n and len(self._ready):
            item = self._ready.pop()
            if item.id not in self._pending or item.id in self._leases:
                continue  # acked or re-leased since it was pushed: a stale entry
            item = item._replace(deliveries=item.deliveries + 1)
            self._pending[item.id] = item
            self._leases[item.id] = (holder, expires)
            heapq.heappush(self._expiry, (expires, item.id))
            out.append(item)
        return out

    def ack(self, ids: Iterable[str]) -> int:
        """Remove finished items (their outcome is recorded). Unknown ids are ignored."""
        n = 0
        for i in ids:
            if self._pending.pop(i, None) is not None:
                self._leases.pop(i, None)
                n += 1
        self.acked_total += n
        return n

    def extend(self, ids: Iterable[str], holder: str, lease_s: float, now: float) -> int:
        """Renew leases still held by ``holder``; returns how many were renewed."""
        n = 0
        expires = now + lease_s
        for i in ids:
            lease = self._leases.get(i)
            if lease is not None and lease[0] == holder:
                self._leases[i] = (holder, expires)
                heapq.heappush(self._expiry, (expires, i))
                n += 1
        return n

    def _requeue(self, i: str) -> Item | None:
        """Leased -> ready; returns the item if it is exhausted (and removes it)."""
        if self._leases.pop(i, None) is None:
            return None
        item = self._pending[i]
        if item.deliveries >= self.max_deliveries:
            del self._pending[i]
            self.exhausted_total += 1
            return item
        self._ready.push(item, redelivery=True)
        self.redelivered_total += 1
        return None

    def nack(self, ids: Iterable[str]) -> list[Item]:
        """Give leased items back for redelivery (their holder could not finish them).

        Returns the items that have now been delivered ``max_deliveries`` times: they
        are removed and the caller must record them as failed.
        """
        return [it for i in ids if (it := self._requeue(i)) is not None]

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

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def stats(self, now_unix_s: float) -> QueueStats:
        oldest = next(iter(self._pending.values()), None)
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
        )
