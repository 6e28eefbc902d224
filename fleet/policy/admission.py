"""Admission control: refuse a task at the door when it would wait too long. Pure.

Two halves, joined by one plain value (``PoolLoad``):

- ``LoadEstimator`` runs in the controller. Each control interval it turns a pool's
  queue figures (tasks pending by priority, tasks admitted and tasks that left, in
  total) and the dispatcher's in-flight count and capacity into a ``PoolLoad``: what
  is pending at each priority, how fast the pool drains, and how fast each priority
  arrives.
- ``Admission`` runs at every entry point (the Python client, the HTTP ingress, the
  Kafka intake), on the last ``PoolLoad`` the controller published: no actor call per
  task, no shared actor on the submit path. For each task it predicts the time to its
  completion from the work ahead of it and the pool's drain rate, and admits it or
  sheds it (``Verdict``).

The prediction. With a queue that serves higher priorities first (the ``priority``
discipline), the work ahead of a task of priority ``p`` is what is pending at ``p`` and
above, and it drains at the pool's rate less the arrival rate of strictly higher
priorities (they will overtake it); otherwise everything pending is ahead of it, at the
full rate. ``wait = (ahead + 1) / rate``: the queue wait, the work in flight ahead of
it and its own turn, so it is compared with the task's deadline as it stands.

The rule. A task of class ``c`` (``budgets.priority_classes``, highest first) is shed
when ``wait > share_c * max_queue_wait_s`` or ``wait > share_c * (deadline - now)``:
lower classes have smaller shares, so they are shed first and the highest class last.
A shed answer carries ``retry_after_s``: how long until, at the measured rate, the
wait would be within the limit. A pool with no agent able to run (``down``) refuses
everything with ``unavailable`` (HTTP 503), and a view older than ``stale_after_s``
admits everything: the controller restarting must not close the door.

Between two views an entry point counts what it admitted itself, scaled up by its share
of what every entry point admits (``EntryShares``, kept by the controller from what the
entry points report with each view request): two entry points taking half the load
each count each of their admissions twice. So a burst within one control interval
cannot slip past the rule, from one entry point or from several.

Why hand-written: this is the submit hot path (a few additions per task), and the
simulator runs the same objects on virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from fleet.spec.admission import AdmissionSpec
from fleet.spec.budgets import PriorityClass
from fleet.task import MAX_PRIORITY

LEVELS = MAX_PRIORITY + 1
SHED = "shed"
UNAVAILABLE = "unavailable"
DEADLINE_EXCEEDED = "deadline_exceeded"
# A drain or arrival estimate follows each interval's measurement this much.
EWMA_ALPHA = 0.5
# An entry point's share of the admissions is taken as at least this (its own count
# is scaled by at most 1 / MIN_SHARE).
MIN_SHARE = 0.05
# A pool that cannot run anything is asked again after this long.
DOWN_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class AdmissionRule:
    """A pool's admission settings as the controller publishes them (so ``fleet
    apply`` reaches every entry point with the next view)."""

    enabled: bool
    max_queue_wait_s: float
    stale_after_s: float
    # Per priority 0..9: (class name, shed_wait_share).
    classes: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, spec: AdmissionSpec, classes: Sequence[PriorityClass]) -> AdmissionRule:
        def class_of(p: int) -> PriorityClass:
            return next((c for c in classes if p >= c.min_task_priority), classes[-1])

        return cls(
            spec.enabled,
            spec.max_queue_wait_s,
            spec.stale_after_s,
            tuple((class_of(p).name, class_of(p).shed_wait_share) for p in range(LEVELS)),
        )


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One pool's load as the controller saw it at ``taken_unix_s``."""

    rule: AdmissionRule
    taken_unix_s: float
    pending: tuple[int, ...]  # tasks queued or running, by priority 0..9
    drain_per_s: float | None  # tasks the pool completes per second (None: unknown)
    arrivals_per_s: tuple[float, ...]  # tasks admitted per second, by priority
    by_priority: bool  # the queue serves higher priorities first
    down: bool = False  # no agent can run: every task is refused as unavailable


class Verdict(NamedTuple):
    admitted: bool
    reason: str | None  # None, SHED, UNAVAILABLE or DEADLINE_EXCEEDED
    wait_s: float  # the predicted time to completion (inf: the pool cannot drain it)
    retry_after_s: float  # 0 when admitted


ADMIT = Verdict(True, None, 0.0, 0.0)


class _Rate:
    """An EWMA of a counter's growth per second."""

    __slots__ = ("last", "rate")

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None
        self.rate: float | None = None

    def step(self, now_s: float, total: float) -> float | None:
        """The counter's growth per second since the last step (None at the first, or
        after a counter that went back: a restarted shard)."""
        last, self.last = self.last, (now_s, total)
        if last is None or now_s <= last[0] or total < last[1]:
            return None
        return (total - last[1]) / (now_s - last[0])

    def mix(self, sample: float) -> float:
        self.rate = (
            sample
            if self.rate is None
            else (EWMA_ALPHA * sample + (1 - EWMA_ALPHA) * self.rate)
        )
        return self.rate


@dataclass
class LoadEstimator:
    """A pool's drain and arrival rates, from the controller's per-tick figures."""

    drain: _Rate = field(default_factory=_Rate)  # the estimate (its ``rate``)
    done: _Rate = field(default_factory=_Rate)  # tasks the agents finished
    busy: _Rate = field(default_factory=_Rate)  # slot-seconds in flight
    arrivals: list[_Rate] = field(default_factory=lambda: [_Rate() for _ in range(LEVELS)])

    def observe(
        self,
        rule: AdmissionRule,
        now_s: float,
        now_unix_s: float,
        pending: Sequence[int],
        admitted_total: Sequence[int],
        done_total: int,
        busy_slot_s: float,
        capacity: int,
        by_priority: bool,
        down: bool = False,
    ) -> PoolLoad:
        """The pool's ``PoolLoad`` now. ``admitted_total``: tasks ever admitted, by
        priority; ``done_total``: tasks the pool's agents ever finished (acked: not
        those the queue failed itself, past their deadline, which took no agent's
        time); ``busy_slot_s``: the integral of the tasks in flight over
        time (slot-seconds, the dispatcher's); ``capacity``: the slots the pool may
        fill now.

        The drain rate is the pool's *capacity* to complete, not its completions: a
        pool half busy completes half what it could. Over the interval a task took
        ``busy / done`` slot-seconds (Little's law), so ``capacity`` slots complete
        ``capacity * done / busy`` per second. An interval with nothing completed or
        nothing in flight says nothing of capacity and keeps the last estimate.
        """
        done = self.done.step(now_s, done_total)
        busy = self.busy.step(now_s, busy_slot_s)
        if done and busy and done > 0 and busy > 0 and capacity > 0:
            # done and busy are per second of the same interval: their ratio is a rate
            # per slot; the pool never drains faster than its arrivals could be served.
            self.drain.mix(capacity * done / busy)
        for p in range(LEVELS):
            rate = self.arrivals[p].step(now_s, admitted_total[p])
            if rate is not None:
                self.arrivals[p].mix(rate)
        return PoolLoad(
            rule=rule,
            taken_unix_s=now_unix_s,
            pending=tuple(pending),
            drain_per_s=self.drain.rate,
            arrivals_per_s=tuple(a.rate or 0.0 for a in self.arrivals),
            by_priority=by_priority,
            down=down,
        )


class _View:
    """One pool's load as an entry point uses it: work ahead and rate per priority."""

    __slots__ = ("added", "ahead", "load", "rate", "weight")

    def __init__(self, load: PoolLoad, share: float = 1.0):
        self.load = load
        pending, arrivals = load.pending, load.arrivals_per_s
        drain = load.drain_per_s
        if load.by_priority:
            self.ahead = [float(sum(pending[p:])) for p in range(LEVELS)]
            higher = [sum(arrivals[p + 1 :]) for p in range(LEVELS)]
        else:
            self.ahead = [float(sum(pending))] * LEVELS
            higher = [0.0] * LEVELS
        # None: no rate measured yet, so nothing can be predicted (admit).
        self.rate: list[float | None] = [
            None if drain is None else max(drain - h, 0.0) for h in higher
        ]
        self.added = [0.0] * LEVELS  # admitted since this view (all entry points)
        # Each task admitted here stands for 1 / share admitted by every entry point.
        self.weight = 1.0 / min(1.0, max(share, MIN_SHARE))

    def wait_s(self, priority: int, now_unix_s: float) -> float | None:
        rate = self.rate[priority]
        if rate is None:
            return None
        gone = rate * max(0.0, now_unix_s - self.load.taken_unix_s)
        # The task completes once what is ahead of it, and then itself, has drained.
        ahead = max(0.0, self.ahead[priority] - gone) + self.added[priority] + 1
        return ahead / rate if rate > 0 else math.inf

    def add(self, priority: int) -> None:
        added, w = self.added, self.weight
        if self.load.by_priority:
            for q in range(priority + 1):
                added[q] += w
        else:
            for q in range(LEVELS):
                added[q] += w


class Admission:
    """One entry point's admission decisions, on the views ``update`` gives it.

    ``clock`` gives Unix seconds (deadlines are wall-clock times). ``shed_counts``
    counts refusals by (pool, priority, reason, tenant label) until ``take_counts``
    empties it: the
    entry point hands them to the controller with its next view request, and shed
    demand counts toward the pool's desired agents.
    """

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._views: dict[str, _View] = {}
        self.shed_counts: dict[tuple[str, int, str, str], int] = {}
        self.enabled = False  # whether any view asks for admission control

    def update(self, loads: Mapping[str, PoolLoad], share: float = 1.0) -> None:
        """New views; ``share``: this entry point's share of the tasks every entry
        point admits (``EntryShares``), so what it admits before the next view is
        counted for all of them."""
        self._views = {pool: _View(load, share) for pool, load in loads.items()}
        self.enabled = any(v.load.rule.enabled for v in self._views.values())

    def load(self, pool: str) -> PoolLoad | None:
        """The last view of ``pool`` (None: none yet)."""
        view = self._views.get(pool)
        return None if view is None else view.load

    def decide(
        self,
        pool: str,
        priority: int,
        deadline_unix_s: float | None = None,
        tenant: Callable[[], str] | str = "none",
    ) -> Verdict:
        """Admit or refuse one task for ``pool``; an admitted task is counted as ahead
        of the next ones (the caller queues it). ``tenant``: the task's tenant label
        for the refusal counts (a callable is asked only on a refusal)."""
        now = self._clock()
        if deadline_unix_s is not None and deadline_unix_s <= now:
            return self._refuse(pool, priority, DEADLINE_EXCEEDED, math.inf, 0.0, tenant)
        view = self._views.get(pool)
        if view is None:
            return ADMIT
        rule = view.load.rule
        if not rule.enabled or now - view.load.taken_unix_s > rule.stale_after_s:
            return ADMIT
        if view.load.down:
            return self._refuse(
                pool, priority, UNAVAILABLE, math.inf, DOWN_RETRY_AFTER_S, tenant
            )
        wait = view.wait_s(priority, now)
        if wait is None:
            view.add(priority)
            return ADMIT
        share = rule.classes[priority][1]
        limit = share * rule.max_queue_wait_s
        if deadline_unix_s is not None:
            limit = min(limit, share * (deadline_unix_s - now))
        if wait <= limit:
            view.add(priority)
            return Verdict(True, None, wait, 0.0)
        retry = wait - limit if math.isfinite(wait) else rule.max_queue_wait_s
        return self._refuse(pool, priority, SHED, wait, retry, tenant)

    def _refuse(
        self,
        pool: str,
        priority: int,
        reason: str,
        wait: float,
        retry_after_s: float,
        tenant: Callable[[], str] | str,
    ) -> Verdict:
        key = (pool, priority, reason, tenant if isinstance(tenant, str) else tenant())
        self.shed_counts[key] = self.shed_counts.get(key, 0) + 1
        return Verdict(False, reason, wait, retry_after_s)

    def take_counts(self) -> dict[tuple[str, int, str, str], int]:
        out, self.shed_counts = self.shed_counts, {}
        return out


class EntryShares:
    """Each entry point's share of the tasks admitted, from what they report (the
    controller keeps one per fleet; ``clock`` in seconds, any origin).

    An entry point reports the tasks it admitted since its last report; its rate is
    an EWMA of them per second. Its share is its rate over the sum of the rates of
    the entry points heard from within ``horizon_s``; one with nothing admitted yet
    gets an equal share. Entry points not heard from within ``horizon_s`` are dropped.
    """

    def __init__(self, horizon_s: float):
        self.horizon_s = horizon_s
        self._entries: dict[str, tuple[float, float]] = {}  # id -> (last report, rate)

    def report(self, entry: str, admitted: int, now_s: float) -> float:
        last = self._entries.get(entry)
        if last is None:
            rate = 0.0
        else:
            dt = max(now_s - last[0], 1e-3)
            rate = EWMA_ALPHA * (admitted / dt) + (1 - EWMA_ALPHA) * last[1]
        self._entries[entry] = (now_s, rate)
        live = {e: r for e, (t, r) in self._entries.items() if now_s - t <= self.horizon_s}
        self._entries = {e: self._entries[e] for e in live}
        total = sum(live.values())
        if total <= 0 or rate <= 0:
            return 1.0 / len(live)
        return rate / total
