"""Small statistics with one definition each, shared by live figures and the simulator.

Pure: no Ray, no clock, no randomness. The ledger's summaries, the chaos harness, the
benchmarks and the simulator's report all compute these figures here, so a p99, a
fairness index or a recovery time means the same thing wherever it is printed.

* **Percentile** (``percentile``, ``percentiles``): nearest rank. The q-th percentile
  of n values is the smallest value with at least q x n of the values at or below it:
  the ``ceil(q x n)``-th smallest (1-based), the smallest for q = 0. It is always one
  of the values (no interpolation), so a p99 of latencies is a latency some task had.
  A median of an even count is the lower middle value.
* **Jain's fairness index** (``jain_index``): ``(sum x)^2 / (n sum x^2)``, 1 when all
  are equal, 1/n when one has everything.
* **Recovery time** (``recovery_s``): see its docstring; ``RECOVERY_PRE_WINDOW_S``,
  ``RECOVERY_POST_WINDOW_S`` and ``RECOVERY_LEVEL`` are its parameters.
* **Concurrency** (``most_at_once``): the most of a set of (start, end) spans that
  overlap at one instant; a span that ends when another starts does not overlap it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# Recovery: throughput is compared with its mean over this long before the disruption,
RECOVERY_PRE_WINDOW_S = 5.0
# averaged over this long from each candidate start (one lucky bucket is not recovery),
RECOVERY_POST_WINDOW_S = 3.0
# and is back at this share of that level.
RECOVERY_LEVEL = 0.9
DEFAULT_PERCENTILES = (0.5, 0.95, 0.99)
# q x n is rounded to this many decimals before the ceiling, so that 0.07 x 100
# (7.000000000000001 in binary floating point) ranks as 7, not 8.
_RANK_DECIMALS = 6


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank ``q``-quantile (``q`` in [0, 1]) of already sorted values.

    The smallest value with at least ``q`` of the values at or below it (see the module
    docstring); None when there are no values.
    """
    return _at_rank(sorted_values, q) if sorted_values else None


def _at_rank(sorted_values: Sequence[float], q: float) -> float:
    if not 0 <= q <= 1:
        raise ValueError(f"q must be within [0, 1], got {q}")
    n = len(sorted_values)
    rank = math.ceil(round(q * n, _RANK_DECIMALS))
    return sorted_values[min(n - 1, max(0, rank - 1))]


def median(values: Iterable[float]) -> float:
    """Nearest-rank median of unsorted ``values`` (the lower middle of an even count);
    ValueError when there are none."""
    v = sorted(values)
    if not v:
        raise ValueError("median of no values")
    return _at_rank(v, 0.5)


def percentile_key(q: float) -> str:
    """The name of quantile ``q`` in a figure: 0.5 -> ``p50``, 0.995 -> ``p99.5``."""
    return f"p{round(q * 100, 4):g}"


def percentiles(
    values: Iterable[float], qs: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, float]:
    """Nearest-rank percentiles of unsorted ``values``, keyed ``p50``, ``p95``, ...

    For reports that always carry numbers: no values gives 0.0 for each.
    """
    v = sorted(values)
    return {percentile_key(q): _at_rank(v, q) if v else 0.0 for q in qs}


def most_at_once(spans: Iterable[tuple[float, float]]) -> int:
    """The most spans (start, end) open at one instant: how many tasks ran at once."""
    events = sorted(e for s, f in spans for e in ((s, 1), (f, -1)))
    now = most = 0
    for _, step in events:  # at equal times the end (-1) sorts first
        now += step
        most = max(most, now)
    return most


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index of non-negative values: ``(sum x)^2 / (n sum x^2)``.

    1 when all are equal, 1/n when one has everything; 1 for no values or all zeros
    (nothing is shared unfairly). Sums are exact (``math.fsum``).
    """
    xs = list(values)
    sq = math.fsum(x * x for x in xs)
    if not xs or sq == 0:
        return 1.0
    return math.fsum(xs) ** 2 / (len(xs) * sq)


def _buckets(window_s: float, bucket_s: float) -> int:
    """Whole buckets covering ``window_s``: at least one."""
    return max(1, math.ceil(round(window_s / bucket_s, _RANK_DECIMALS)))


def recovery_s(
    done: Sequence[float],
    t0_s: float,
    bucket_s: float = 1.0,
    offered: Sequence[float] | None = None,
    *,
    pre_window_s: float = RECOVERY_PRE_WINDOW_S,
    post_window_s: float = RECOVERY_POST_WINDOW_S,
    level: float = RECOVERY_LEVEL,
) -> float | None:
    """Seconds from a disruption (a kill) at ``t0_s`` until throughput is back.

    ``done[i]`` counts the completions in bucket ``i``, the interval ``[i * bucket_s,
    (i + 1) * bucket_s)`` on the axis ``t0_s`` is given on; ``offered[i]``, when known,
    the arrivals in it.

    * Reference level: the mean completions per second over the whole buckets in the
      ``pre_window_s`` before the disruption's bucket (at least one bucket; fewer when
      the series starts later).
    * Back: the first bucket ``s``, from the disruption's own bucket on, such that the
      buckets covering ``post_window_s`` from ``s`` complete, per second, at least
      ``level`` x the reference, or ``level`` x what arrived in them when that is less
      (a pool cannot complete more than it is offered). Averaging over
      ``post_window_s`` keeps one lucky bucket from counting as recovery.

    Returns the start of bucket ``s`` minus ``t0_s``, floored at 0 (0: throughput never
    fell below the mark); 0 when there is no reference (nothing before the disruption,
    or nothing completed then); None when it is not back within the series.
    """
    k = max(0, int(t0_s // bucket_s))
    pre = done[max(0, k - _buckets(pre_window_s, bucket_s)) : k]
    if not pre:
        return 0.0
    pre_rate = sum(pre) / (len(pre) * bucket_s)
    if pre_rate == 0:
        return 0.0
    post = _buckets(post_window_s, bucket_s)
    span_s = post * bucket_s
    for s in range(k, len(done) - post + 1):
        rate = sum(done[s : s + post]) / span_s
        mark = (
            pre_rate if offered is None else min(pre_rate, sum(offered[s : s + post]) / span_s)
        )
        if rate >= level * mark:
            return max(0.0, s * bucket_s - t0_s)
    return None


__all__ = [
    "DEFAULT_PERCENTILES",
    "RECOVERY_LEVEL",
    "RECOVERY_POST_WINDOW_S",
    "RECOVERY_PRE_WINDOW_S",
    "jain_index",
    "median",
    "percentile",
    "percentile_key",
    "percentiles",
    "recovery_s",
]
