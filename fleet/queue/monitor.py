"""Queue monitoring: per-shard and per-queue health from the shards' stats snapshots.

The runtime's control loop calls ``QueueMonitor.observe`` with each shard's
``QueueStats`` (or the dict the shard actor returns) every tick, then ``report`` for
``fleet status`` and ``observations`` for the alert evaluator
(``fleet.policy.queue_alerts``). Time is passed in (``now_s``, any monotonic base);
rates are exponentially smoothed over ``rate_window_s``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleet.policy.queue_alerts import Observations
from fleet.policy.sharding import ShardBalance, shard_balance
from fleet.queue.lease_queue import QueueStats

DEFAULT_RATE_WINDOW_S = 10.0
DEFAULT_STALE_AFTER_S = 30.0

# counter in QueueStats -> the rate it yields
_RATES = {
    "enqueued_total": "enqueue_per_s",
    "dequeued_total": "dequeue_per_s",
    "acked_total": "ack_per_s",
    "expired_total": "lease_expiries_per_s",
    "redelivered_total": "redeliveries_per_s",
    "deadline_exceeded_total": "deadline_exceeded_per_s",
}
_STAT_FIELDS = {f.name for f in dataclasses.fields(QueueStats)}


@dataclass(frozen=True, slots=True)
class ShardHealth:
    """One shard at one observation: gauges, totals, and smoothed rates (per second)."""

    queue: str
    shard: int
    observed_at_s: float
    depth: int
    leased: int
    oldest_age_s: float
    age_p50_s: float
    age_p90_s: float
    age_p99_s: float
    enqueued_total: int
    dequeued_total: int
    acked_total: int
    lease_expiries_total: int
    redeliveries_total: int
    exhausted_total: int
    deadline_exceeded_total: int
    enqueue_per_s: float
    dequeue_per_s: float
    ack_per_s: float
    lease_expiries_per_s: float
    redeliveries_per_s: float
    deadline_exceeded_per_s: float

    @property
    def pending(self) -> int:
        return self.depth + self.leased

    @property
    def subject(self) -> str:
        return f"{self.queue}/{self.shard}"

    def metrics(self) -> dict[str, float]:
        """The values shard-scope alert rules can watch (AlertMetric names)."""
        return {
            "depth": self.depth,
            "leased": self.leased,
            "pending": self.pending,
            "oldest_age_s": self.oldest_age_s,
            "age_p50_s": self.age_p50_s,
            "age_p90_s": self.age_p90_s,
            "age_p99_s": self.age_p99_s,
            "enqueue_per_s": self.enqueue_per_s,
            "dequeue_per_s": self.dequeue_per_s,
            "lease_expiries_per_s": self.lease_expiries_per_s,
            "redeliveries_per_s": self.redeliveries_per_s,
            "deadline_exceeded_per_s": self.deadline_exceeded_per_s,
        }


@dataclass(frozen=True, slots=True)
class QueueHealth:
    """A queue (all shards of a capability/region). Sizes and rates are sums; ages are
    the worst shard's (the oldest item anywhere; percentiles are the highest shard
    percentile, an upper bound on the queue's). ``balance`` is over shard depths."""

    queue: str
    shards: tuple[ShardHealth, ...]
    stale_shards: tuple[int, ...]
    depth: int
    leased: int
    oldest_age_s: float
    age_p50_s: float
    age_p90_s: float
    age_p99_s: float
    enqueue_per_s: float
    dequeue_per_s: float
    lease_expiries_total: int
    redeliveries_total: int
    lease_expiries_per_s: float
    redeliveries_per_s: float
    deadline_exceeded_per_s: float
    balance: ShardBalance

    @property
    def pending(self) -> int:
        return self.depth + self.leased

    def metrics(self) -> dict[str, float]:
        """The values queue-scope alert rules can watch (AlertMetric names)."""
        return {
            "depth": self.depth,
            "leased": self.leased,
            "pending": self.pending,
            "oldest_age_s": self.oldest_age_s,
            "age_p50_s": self.age_p50_s,
            "age_p90_s": self.age_p90_s,
            "age_p99_s": self.age_p99_s,
            "enqueue_per_s": self.enqueue_per_s,
            "dequeue_per_s": self.dequeue_per_s,
            "lease_expiries_per_s": self.lease_expiries_per_s,
            "redeliveries_per_s": self.redeliveries_per_s,
            "deadline_exceeded_per_s": self.deadline_exceeded_per_s,
            "shard_max_over_mean": self.balance.max_over_mean,
            "shard_cv": self.balance.cv,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``fleet status --json``."""
        d = dict(self.metrics())
        d.update(
            queue=self.queue,
            lease_expiries_total=self.lease_expiries_total,
            redeliveries_total=self.redeliveries_total,
            balance=dataclasses.asdict(self.balance),
            stale_shards=list(self.stale_shards),
            shards=[
                {"shard": s.shard, **s.metrics(), "pending": s.pending} for s in self.shards
            ],
        )
        return d


class _Rate:
    __slots__ = ("last_t", "last_total", "rate")

    def __init__(self, t: float, total: int):
        self.last_t = t
        self.last_total = total
        self.rate: float | None = None  # unknown until a second observation

    def update(self, t: float, total: int, window_s: float) -> float:
        dt = t - self.last_t
        if dt <= 0:
            return self.rate or 0.0
        # A total that went down means the shard restarted and its counters reset.
        delta = total - self.last_total if total >= self.last_total else total
        inst = delta / dt
        if self.rate is None:
            self.rate = inst
        else:
            alpha = 1.0 - math.exp(-dt / window_s)  # EWMA with time constant window_s
            self.rate += alpha * (inst - self.rate)
        self.last_t, self.last_total = t, total
        return self.rate


class QueueMonitor:
    """Accumulates shard stats snapshots into per-shard and per-queue health."""

    def __init__(
        self,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ):
        if rate_window_s <= 0 or stale_after_s <= 0:
            raise ValueError(
                f"rate_window_s ({rate_window_s}) and stale_after_s "
                f"({stale_after_s}) must be > 0"
            )
        self.rate_window_s = rate_window_s
        self.stale_after_s = stale_after_s
        self._rates: dict[tuple[str, int], dict[str, _Rate]] = {}
        self._latest: dict[tuple[str, int], ShardHealth] = {}

    def observe(
        self, queue: str, shard: int, stats: QueueStats | Mapping[str, Any], now_s: float
    ) -> ShardHealth:
        """Record one shard's stats taken at ``now_s``; returns its health."""
        st = (
            stats
            if isinstance(stats, QueueStats)
            else QueueStats(**{k: v for k, v in stats.items() if k in _STAT_FIELDS})
        )
        k = (queue, shard)
        rates = self._rates.get(k)
        if rates is None:
            self._rates[k] = {c: _Rate(now_s, getattr(st, c)) for c in _RATES}
            values = dict.fromkeys(_RATES.values(), 0.0)
        else:
            values = {
                r: rates[c].update(now_s, getattr(st, c), self.rate_window_s)
                for c, r in _RATES.items()
            }
        h = ShardHealth(
            queue=queue,
            shard=shard,
            observed_at_s=now_s,
            depth=st.depth,
            leased=st.leased,
            oldest_age_s=st.oldest_age_s,
            age_p50_s=st.age_p50_s,
            age_p90_s=st.age_p90_s,
            age_p99_s=st.age_p99_s,
            enqueued_total=st.enqueued_total,
            dequeued_total=st.dequeued_total,
            acked_total=st.acked_total,
            lease_expiries_total=st.expired_total,
            redeliveries_total=st.redelivered_total,
            exhausted_total=st.exhausted_total,
            deadline_exceeded_total=st.deadline_exceeded_total,
            **values,
        )
        self._latest[k] = h
        return h

    def forget(self, queue: str, shard: int | None = None) -> None:
        """Drop a shard (or a whole queue) that no longer exists."""
        for k in [k for k in self._latest if k[0] == queue and shard in (None, k[1])]:
            self._latest.pop(k, None)
            self._rates.pop(k, None)

    def report(self, now_s: float) -> dict[str, QueueHealth]:
        """Health per queue. Shards not observed for ``stale_after_s`` are listed as
        stale and left out of the figures."""
        by_queue: dict[str, list[ShardHealth]] = {}
        stale: dict[str, list[int]] = {}
        for (q, s), h in sorted(self._latest.items()):
            if now_s - h.observed_at_s > self.stale_after_s:
                stale.setdefault(q, []).append(s)
                by_queue.setdefault(q, [])
            else:
                by_queue.setdefault(q, []).append(h)
        out = {}
        for q, hs in by_queue.items():
            out[q] = QueueHealth(
                queue=q,
                shards=tuple(hs),
                stale_shards=tuple(stale.get(q, ())),
                depth=sum(h.depth for h in hs),
                leased=sum(h.leased for h in hs),
                oldest_age_s=max((h.oldest_age_s for h in hs), default=0.0),
                age_p50_s=max((h.age_p50_s for h in hs), default=0.0),
                age_p90_s=max((h.age_p90_s for h in hs), default=0.0),
                age_p99_s=max((h.age_p99_s for h in hs), default=0.0),
                enqueue_per_s=sum(h.enqueue_per_s for h in hs),
                dequeue_per_s=sum(h.dequeue_per_s for h in hs),
                lease_expiries_total=sum(h.lease_expiries_total for h in hs),
                redeliveries_total=sum(h.redeliveries_total for h in hs),
                lease_expiries_per_s=sum(h.lease_expiries_per_s for h in hs),
                redeliveries_per_s=sum(h.redeliveries_per_s for h in hs),
                deadline_exceeded_per_s=sum(h.deadline_exceeded_per_s for h in hs),
                balance=shard_balance([h.depth for h in hs]),
            )
        return out

    def observations(
        self, now_s: float, report: Mapping[str, QueueHealth] | None = None
    ) -> Observations:
        """What the alert evaluator sees: metrics per queue and per shard subject."""
        report = self.report(now_s) if report is None else report
        return Observations(
            queues={q: h.metrics() for q, h in report.items()},
            shards={s.subject: s.metrics() for h in report.values() for s in h.shards},
        )
