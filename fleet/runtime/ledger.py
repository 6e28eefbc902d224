"""Ledger: the record of every task's outcome, exactly once by task id.

Delivery is at-least-once (a lease can expire under a slow holder, a host can die after
finishing), so the same task may be *executed* twice. The ledger keeps the first
outcome recorded for an id and counts every later one as a duplicate execution: the
outcome is recorded once, duplicates are reported, never hidden.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

from fleet.task import Outcome


def percentiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict[str, float]:
    """Nearest-rank percentiles, keyed p50/p95/p99 (empty input gives zeros)."""
    if not values:
        return {f"p{round(q * 100)}": 0.0 for q in qs}
    v = sorted(values)
    n = len(v)
    return {f"p{round(q * 100)}": v[min(n - 1, max(0, int(q * n + 0.5) - 1))] for q in qs}


@ray.remote(num_cpus=0)
class Ledger:
    def __init__(self) -> None:
        self._outcomes: dict[str, Outcome] = {}
        self._duplicates: Counter[str] = Counter()

    async def record(self, outcomes: list[Outcome]) -> int:
        """Record outcomes; returns how many were new (the rest were duplicates)."""
        new = 0
        book = self._outcomes
        for o in outcomes:
            if o.task_id in book:
                self._duplicates[o.task_id] += 1
            else:
                book[o.task_id] = o
                new += 1
        return new

    async def get(self, ids: list[str]) -> list[Outcome | None]:
        return [self._outcomes.get(i) for i in ids]

    async def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that have no recorded outcome."""
        book = self._outcomes
        return [i for i in ids if i not in book]

    async def count(self) -> int:
        return len(self._outcomes)

    async def summary(self, ids: list[str] | None = None) -> dict[str, Any]:
        """Counts, latency percentiles, failure reasons and token/cost totals.

        With ``ids``, only those tasks count and ``lost`` is the number of ids with no
        outcome: accounting comes from the records, not from counters.
        """
        book = self._outcomes
        if ids is None:
            records = list(book.values())
            lost = 0
        else:
            records = [o for i in ids if (o := book.get(i)) is not None]
            lost = len(ids) - len(records)
        ok = [o for o in records if o.ok]
        reasons = Counter(o.reason or "error" for o in records if not o.ok)
        latencies = [o.finished_unix_s - o.submitted_unix_s for o in records]
        first = min((o.submitted_unix_s for o in records), default=0.0)
        last = max((o.finished_unix_s for o in records), default=0.0)
        dupes = self._duplicates if ids is None else {i: self._duplicates[i] for i in ids
                                                      if i in self._duplicates}
        return {
            "recorded": len(records),
            "completed": len(ok),
            "failed": len(records) - len(ok),
            "lost": lost,
            "failure_reasons": dict(reasons),
            "sample_errors": [o.error for o in records if not o.ok][:3],
            "duplicate_executions": sum(dupes.values()),
            # Recorded from a second or later delivery: their first holder died, was
            # removed past its drain timeout, or handed them back.
            "redelivered": sum(1 for o in records if o.deliveries > 1),
            "latency_s": percentiles(latencies),
            "first_submit_unix_s": first,
            "last_finish_unix_s": last,
            "input_tokens": sum(o.input_tokens for o in records),
            "output_tokens": sum(o.output_tokens for o in records),
            "cost_usd": round(sum(o.cost_usd for o in records), 6),
        }
