"""Admission control: refuse a task at the door when it would wait too long. Pure.

Two halves, joined by one plain value (``PoolLoad``):

- ``LoadEstimator`` runs in the controller. Each control interval it turns a pool's
  queue figures (tasks pending by priority, tasks admitted and tasks its agents
  finished, in total) and the dispatcher's busy slot-seconds and capacity into a
  ``PoolLoad``: what is pending at each priority, how fast the pool can drain, and how
  fast each priority arrives.
- ``Admission`` runs at every entry point (the Python client, the HTTP ingress, the
  Kafka intake), on the last ``PoolLoad`` the controller published: no actor call per
  task, no shared actor on the submit path. For each task it predicts the time to its
  completion from the work ahead of it and the pool's drain rate, and admits it or
  refuses it (``Verdict``).

The prediction. With a queue that serves higher priorities first (the ``priority``
discipline), the work ahead of a task of priority ``p`` is what is pending at ``p`` and
above, and it drains at the pool's rate less the arrival rate of strictly higher
priorities (they will overtake it); with any other discipline everything pending is
ahead of it, at the full rate (so under ``deadline`` or ``utility`` order the
prediction is pessimistic for the tasks those orders favour, and aging is not modelled).
The task starts once all but ``slots - 1`` of what is ahead have left, then takes one
task's time (``slots / drain``): ``wait = max(0, ahead + 1 - slots) / rate +
slots / drain``, the time to its completion, compared with its deadline as it stands.

The rule. A task of class ``c`` (``budgets.priority_classes``, highest first) is refused
when ``wait > share_c * max_queue_wait_s`` or ``wait > share_c * (deadline - now)``:
lower classes have smaller shares, so they are refused first and the highest class
last. The refusal is ``shed`` with ``retry_after_s``, how long until the task would be
admitted at the measured rate if nothing more arrived; or ``deadline_exceeded`` when
that is never before its deadline (a retry cannot help), as for a deadline already past.
A pool with no agent able to run (``down``) refuses everything with ``unavailable``
(HTTP 503), and a view older than ``stale_after_s`` admits everything: the controller
restarting must not close the door. A pool with no drain rate yet cannot predict a
wait: one whose agents never finished a task (``PoolLoad.never_done``) admits its
highest class, and of the others ``UNMEASURED_ROUNDS`` rounds of its slots ahead of a
task, and sheds the rest briefly, until its first completions measure it; one that did
(a restarted controller has no rate yet) admits everything until it has one.

Between two views an entry point counts what it admitted, scaled up by its share of
what every entry point admits to that pool (``EntryShares``, kept by the controller
from what the entry points report with each view request): two entry points taking
half a pool's load each count each of their admissions twice, and a new view takes
over the admissions made after its figures were read. Other entry points' bursts
within one interval still show only in the next view (the prediction is an estimate;
the rule is only as good as it).

Why hand-written: this is the submit hot path (a few additions per task), and the
simulator runs the same objects on virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from fleet.spec.admission import AdmissionSpec
from fleet.spec.budgets import BudgetsSpec
from fleet.task import MAX_PRIORITY

LEVELS = MAX_PRIORITY + 1
SHED = "shed"
UNAVAILABLE = "unavailable"
DEADLINE_EXCEEDED = "deadline_exceeded"
# How a ``deadline_exceeded`` refusal is *counted* (never answered) when the deadline had
# not passed but the work ahead would make the task miss it: demand that a bigger pool
# could have served, unlike a deadline already past.
UNREACHABLE = "deadline_unreachable"
# A drain or arrival estimate follows each interval's measurement this much.
EWMA_ALPHA = 0.5
# An entry point's share of the admissions is taken as at least this (its own count
# is scaled by at most 1 / MIN_SHARE).
MIN_SHARE = 0.05
# Busy for this many tasks' worth of slot-seconds (at the drain estimate) with none
# completed: the pool is stalling, and the estimate falls.
STALL_TASKS = 5
# A pool that cannot run anything is asked again after this long.
DOWN_RETRY_AFTER_S = 1.0
# A pool with no drain rate yet (it never completed a task: new, or a fallback that sat
# idle) admits the tasks of its highest class, and of the others this many rounds of its
# slots ahead of a task; it sheds the rest for ``UNMEASURED_RETRY_AFTER_S``, until its
# first completions give it a rate. Admitting everything there let one interval of a
# flash sale flood an idle fallback pool with low-priority work (in the simulator:
# 9,038 of a 20-agent pool's tasks missed their deadline in its queue).
UNMEASURED_ROUNDS = 2
UNMEASURED_RETRY_AFTER_S = 1.0


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
    def of(cls, spec: AdmissionSpec, budgets: BudgetsSpec) -> AdmissionRule:
        """The rule of a pool's ``spec``, with the fleet's priority classes."""
        classes = [budgets.class_of_task(p) for p in range(LEVELS)]
        return cls(
            spec.enabled,
            spec.max_queue_wait_s,
            spec.stale_after_s,
            tuple((c.name, c.shed_wait_share) for c in classes),
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
    slots: int = 0  # tasks the pool may run at once now
    down: bool = False  # no agent can run: every task is refused as unavailable
    degraded: str | None = None  # the degrade rule holding (``fleet.policy.degrade``)
    fallback: str | None = None  # ... and the pool it sends new tasks to
    # ... and, when it answers from the pool's cache, how old an answer may be
    cache_max_age_s: float | None = None
    # The pool's agents never finished a task (new, or a fallback that sat idle): with
    # no drain rate, its admissions are bounded (``UNMEASURED_ROUNDS``). A pool that did
    # finish some but has no rate yet (the controller restarted) admits as before.
    never_done: bool = False


class Verdict(NamedTuple):
    admitted: bool
    reason: str | None  # None, SHED, UNAVAILABLE or DEADLINE_EXCEEDED
    wait_s: float  # the predicted time to completion (inf: the pool cannot drain it)
    retry_after_s: float  # 0 when admitted, and when a retry cannot help


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
    arrivals: list[_Rate] = field(default_factory=lambda: [_Rate() for _ in range(LEVELS)])
    # (time, done total, busy slot-seconds) at the last tick; completions and busy
    # slot-seconds since the last drain sample (an interval with nothing completed
    # carries over into the next).
    _last: tuple[float, int, float] | None = None
    _done_acc: float = 0.0
    _busy_acc: float = 0.0

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
        time); ``busy_slot_s``: the integral of the tasks in flight over time
        (slot-seconds, the dispatcher's); ``capacity``: the slots the pool may fill now.

        The drain rate is the pool's *capacity* to complete, not its completions: a
        pool half busy completes half what it could. A task took ``busy / done``
        slot-seconds (Little's law), so ``capacity`` slots complete ``capacity * done /
        busy`` per second. An interval with nothing completed carries its busy time
        into the next, so long tasks are measured over several intervals. A pool busy
        for ``STALL_TASKS`` tasks' worth of slot-seconds at the current estimate with
        nothing completed is stalling (hung agents, a model API down): the estimate
        falls to at most ``capacity / busy``, as if one task were about to complete.
        """
        last, self._last = self._last, (now_s, done_total, busy_slot_s)
        if (
            last is not None
            and now_s > last[0]
            and done_total >= last[1]  # else a shard or the dispatcher restarted
            and busy_slot_s >= last[2]
            and capacity > 0
        ):
            self._done_acc += done_total - last[1]
            self._busy_acc += busy_slot_s - last[2]
            rate = self.drain.rate
            if self._done_acc > 0 and self._busy_acc > 0:
                self.drain.mix(capacity * self._done_acc / self._busy_acc)
                self._done_acc = self._busy_acc = 0.0
            elif rate and self._busy_acc > STALL_TASKS * capacity / rate:
                self.drain.mix(min(rate, capacity / self._busy_acc))
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
            slots=capacity,
            down=down,
            never_done=done_total == 0,
        )


class _View:
    """One pool's load as an entry point uses it: work ahead and rate per priority,
    and what was admitted since the load was taken (``adds``: (time, priority,
    weight), carried into the next view for the admissions it does not hold yet)."""

    __slots__ = ("added", "adds", "ahead", "drain", "load", "rate", "service_s", "weight")

    def __init__(self, load: PoolLoad, share: float = 1.0):
        self.load = load
        pending, arrivals = load.pending, load.arrivals_per_s
        drain = self.drain = load.drain_per_s
        if load.by_priority:
            self.ahead = [float(sum(pending[p:])) for p in range(LEVELS)]
            higher = [sum(arrivals[p + 1 :]) for p in range(LEVELS)]
        else:
            self.ahead = [float(sum(pending))] * LEVELS
            higher = [0.0] * LEVELS
        # None: no rate measured yet, so nothing can be predicted (admit). A task
        # drains at the pool's rate less what will overtake it.
        self.rate: list[float | None] = [
            None if drain is None else max(drain - h, 0.0) for h in higher
        ]
        # The time one task takes on its slot (slots / drain: Little's law).
        self.service_s = load.slots / drain if drain and load.slots > 0 else 0.0
        self.added = [0.0] * LEVELS  # admitted since the load was taken (all entry points)
        self.adds: list[tuple[float, int, float]] = []
        # Each task admitted here stands for 1 / share admitted by every entry point.
        self.weight = 1.0 / min(1.0, max(share, MIN_SHARE))

    def carry(self, old: _View) -> None:
        """Take over ``old``'s admissions made after this view's load was taken."""
        for t, priority, w in old.adds:
            if t > self.load.taken_unix_s:
                self._count(t, priority, w)

    def wait_s(self, priority: int, now_unix_s: float) -> float | None:
        """The predicted time until a task of ``priority`` admitted now completes."""
        rate = self.rate[priority]
        if rate is None or self.drain is None:
            return None
        # What is ahead of it now: the load's, plus admissions since, less what the
        # pool drained since (a queue served by priority drains from the top).
        gone = self.drain * max(0.0, now_unix_s - self.load.taken_unix_s)
        ahead = max(0.0, self.ahead[priority] + self.added[priority] - gone)
        # It starts once all but (slots - 1) of them have left, and then takes its turn.
        to_start = max(0.0, ahead + 1 - self.load.slots)
        if to_start == 0:
            return self.service_s
        return to_start / rate + self.service_s if rate > 0 else math.inf

    def ahead_now(self, priority: int) -> float:
        """What is ahead of a task of ``priority``: the load's and what was admitted
        since, with nothing drained (for a pool with no rate to drain it at)."""
        return self.ahead[priority] + self.added[priority]

    def add(self, priority: int, now_unix_s: float, sign: float = 1.0) -> None:
        self._count(now_unix_s, priority, sign * self.weight)

    def _count(self, t: float, priority: int, w: float) -> None:
        self.adds.append((t, priority, w))
        added = self.added
        if self.load.by_priority:
            for q in range(priority + 1):
                added[q] += w
        else:
            for q in range(LEVELS):
                added[q] += w


def predicted_wait_s(load: PoolLoad, now_unix_s: float) -> float | None:
    """The wait ``decide`` predicts for a new task of the lowest priority (everything
    pending is ahead of it) on ``load``: the degrade rule's signal (None: no rate
    measured yet)."""
    return _View(load).wait_s(0, now_unix_s)


def _retry_after(wait: float, share: float, max_wait: float, left: float) -> float | None:
    """How long until a refused task would be admitted, if nothing more arrived: its
    wait falls by a second a second, the deadline's limit by ``share`` of one. None
    when that is never before its deadline (a retry cannot help)."""
    if not math.isfinite(wait):
        return None if math.isfinite(left) else max_wait
    t = wait - share * max_wait
    if math.isfinite(left) and wait > share * left:
        if share >= 1:
            return None  # wait - t > left - t for every t: it always misses
        t = max(t, (wait - share * left) / (1 - share))
        if t >= left:
            return None
    return max(t, 0.0)


class Admission:
    """One entry point's admission decisions, on the views ``update`` gives it.

    ``clock`` gives Unix seconds (deadlines are wall-clock times). ``shed_counts``
    counts refusals by (pool, priority, reason, tenant label) until ``take_counts``
    empties it: the entry point hands them to the controller with its next view
    request, and shed demand counts toward the pool's desired agents.
    """

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._views: dict[str, _View] = {}
        self.shed_counts: dict[tuple[str, int, str, str], int] = {}
        self.enabled = False  # whether any view asks for admission control
        self.degrading = False  # whether any view says its pool is degraded

    def update(
        self, loads: Mapping[str, PoolLoad], shares: Mapping[str, float] | None = None
    ) -> None:
        """New views; ``shares``: per pool, this entry point's share of the tasks every
        entry point admits (``EntryShares``; 1 when missing), so what it admits before
        the next view is counted for all of them. A view of the same load as the one
        held is kept as it is (its admissions still count); a newer one takes over the
        admissions made after its load was taken."""
        views = {}
        for pool, load in loads.items():
            old = self._views.get(pool)
            if old is not None and old.load.taken_unix_s == load.taken_unix_s:
                views[pool] = old
                continue
            view = _View(load, (shares or {}).get(pool, 1.0))
            if old is not None:
                view.carry(old)
            views[pool] = view
        self._views = views
        self.enabled = any(v.load.rule.enabled for v in views.values())
        self.degrading = any(v.load.degraded for v in views.values())

    def degraded(self) -> dict[str, tuple[str, str]]:
        """The pools a degrade rule holds, with (the rule, the fallback pool), by the
        views not stale."""
        now = self._clock()
        return {
            pool: (v.load.degraded, v.load.fallback)
            for pool, v in self._views.items()
            if v.load.degraded
            and v.load.fallback
            and now - v.load.taken_unix_s <= v.load.rule.stale_after_s
        }

    def cache_rules(self) -> dict[str, tuple[str, float]]:
        """The pools a degrade rule holds that answer from their cache, with (the rule,
        how old an answer may be), by the views not stale."""
        now = self._clock()
        return {
            pool: (v.load.degraded, v.load.cache_max_age_s)
            for pool, v in self._views.items()
            if v.load.degraded
            and v.load.cache_max_age_s is not None
            and now - v.load.taken_unix_s <= v.load.rule.stale_after_s
        }

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
        count: bool = True,
    ) -> Verdict:
        """Admit or refuse one task for ``pool``; an admitted task is counted as ahead
        of the next ones (the caller queues it). ``tenant``: the task's tenant label
        for the refusal counts (a callable is asked only on a refusal); ``count=False``
        leaves a refusal out of them (a task decided again, which was counted once)."""
        now = self._clock()
        view = self._views.get(pool)
        if view is None:
            return ADMIT
        rule = view.load.rule
        if not rule.enabled:
            return ADMIT
        if deadline_unix_s is not None and deadline_unix_s <= now:
            return self._refuse(
                pool, priority, DEADLINE_EXCEEDED, math.inf, 0.0, tenant, count
            )
        if now - view.load.taken_unix_s > rule.stale_after_s:
            return ADMIT
        if view.load.down:
            return self._refuse(
                pool, priority, UNAVAILABLE, math.inf, DOWN_RETRY_AFTER_S, tenant, count
            )
        wait = view.wait_s(priority, now)
        if wait is None:  # no rate measured yet: a bounded probe, not the open door
            if (
                not view.load.never_done  # a restarted controller: not closing the door
                or rule.classes[priority] == rule.classes[-1]  # the highest: shed last
                or view.ahead_now(priority) < UNMEASURED_ROUNDS * max(1, view.load.slots)
            ):
                view.add(priority, now)
                return ADMIT
            return self._refuse(
                pool, priority, SHED, math.inf, UNMEASURED_RETRY_AFTER_S, tenant, count
            )
        share = rule.classes[priority][1]
        left = math.inf if deadline_unix_s is None else deadline_unix_s - now
        if wait <= share * min(rule.max_queue_wait_s, left):
            view.add(priority, now)
            return Verdict(True, None, wait, 0.0)
        retry = _retry_after(wait, share, rule.max_queue_wait_s, left)
        if retry is None:  # it would miss its deadline whenever it came back
            return self._refuse(
                pool, priority, DEADLINE_EXCEEDED, wait, 0.0, tenant, count, UNREACHABLE
            )
        return self._refuse(pool, priority, SHED, wait, retry, tenant, count)

    def _refuse(
        self,
        pool: str,
        priority: int,
        reason: str,
        wait: float,
        retry_after_s: float,
        tenant: Callable[[], str] | str,
        count: bool,
        counted_as: str | None = None,
    ) -> Verdict:
        if count:
            label = tenant if isinstance(tenant, str) else tenant()
            self.count(pool, priority, counted_as or reason, label)
        return Verdict(False, reason, wait, retry_after_s)

    def withdraw(self, pool: str, priority: int) -> None:
        """Take back the admission of a task ``decide`` admitted that was not queued
        after all (its tenant's bulkhead refused it): it no longer counts as ahead of
        later tasks. A no-op where ``decide`` admitted without counting."""
        now = self._clock()
        view = self._views.get(pool)
        if view is None:
            return
        load = view.load
        fresh = now - load.taken_unix_s <= load.rule.stale_after_s
        if load.rule.enabled and fresh and not load.down:
            view.add(priority, now, -1.0)

    def count(self, pool: str, priority: int, reason: str, tenant: str, n: int = 1) -> None:
        """Count ``n`` refusals (``decide`` does, unless told not to)."""
        key = (pool, priority, reason, tenant)
        self.shed_counts[key] = self.shed_counts.get(key, 0) + n

    def take_counts(self) -> dict[tuple[str, int, str, str], int]:
        out, self.shed_counts = self.shed_counts, {}
        return out


def counts_as_demand(reason: str) -> bool:
    """Whether refusals counted with ``reason`` are demand for agents: ``shed``,
    ``unavailable`` and ``deadline_unreachable`` (a bigger pool would have served
    them), not a deadline already past (``deadline_exceeded``) nor a tenant's bulkhead."""
    return reason in (SHED, UNAVAILABLE, UNREACHABLE)


class ShedDemand:
    """A pool's refusals that count as demand for agents (``counts_as_demand``: a
    bigger pool could have served them), smoothed over control ticks:
    entry points report about once an interval each, not in step with the ticks. The
    controller and the simulator feed the autoscaler ``take(n)`` each tick."""

    __slots__ = ("smooth",)

    def __init__(self) -> None:
        self.smooth = 0.0

    def take(self, n: int) -> int:
        """The demand to report this tick, given ``n`` refusals since the last one."""
        self.smooth = 0.5 * n + 0.5 * self.smooth
        return round(self.smooth)


class EntryShares:
    """Each entry point's share of the tasks admitted to one pool, from what they
    report (the controller keeps one per pool; ``now_s`` in seconds, any origin).

    An entry point reports the tasks it admitted since its last report; its rate is
    an EWMA of them per second. Its share is its rate over the sum of the rates of
    the entry points heard from within ``horizon_s`` (those not heard from are
    dropped). One that admitted nothing lately gets 1: its next admissions count once,
    and the others' show in the next view.
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
        self._entries = {
            e: (t, r) for e, (t, r) in self._entries.items() if now_s - t <= self.horizon_s
        }
        total = sum(r for _, r in self._entries.values())
        return rate / total if rate > 0 else 1.0
