"""Bounded-memory age percentiles of the items a queue holds."""

from __future__ import annotations

import math

DEFAULT_WIDTH_S = 0.001
DEFAULT_MAX_BUCKETS = 512


class SubmitTimeHistogram:
    """Counts of pending items by submit-time bucket, supporting removal.

    Use it to estimate age percentiles of what is waiting now without scanning the
    items. Memory is at most ``max_buckets`` counters: when the submit times span more
    buckets than that, the bucket width doubles and neighbours merge, so the error of a
    percentile is at most one bucket width (the span of pending submit times divided by
    about ``max_buckets / 2``).

    Why removal stays exact after merging: an item with submit time t sits in bucket
    floor(t / w). After doubling, floor(t / 2w) == floor(floor(t / w) / 2), and halving
    a float is exact, so the bucket an item was counted in is the one it is removed
    from, whenever the width changed in between.
    """

    __slots__ = ("_counts", "_initial_width_s", "_max_buckets", "_n", "_width_s")

    def __init__(
        self, width_s: float = DEFAULT_WIDTH_S, max_buckets: int = DEFAULT_MAX_BUCKETS
    ):
        if width_s <= 0 or max_buckets < 2:
            raise ValueError(
                f"need width_s > 0 and max_buckets >= 2, got {width_s}, {max_buckets}"
            )
        self._initial_width_s = width_s
        self._width_s = width_s
        self._max_buckets = max_buckets
        self._counts: dict[int, int] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def width_s(self) -> float:
        return self._width_s

    def add(self, submitted_unix_s: float) -> None:
        b = math.floor(submitted_unix_s / self._width_s)
        counts = self._counts
        counts[b] = counts.get(b, 0) + 1
        self._n += 1
        if len(counts) > self._max_buckets:
            self._coarsen()

    def remove(self, submitted_unix_s: float) -> None:
        b = math.floor(submitted_unix_s / self._width_s)
        c = self._counts.get(b)
        if c is None:
            return  # never added (a caller bug); keep the counts consistent
        if c == 1:
            del self._counts[b]
        else:
            self._counts[b] = c - 1
        self._n -= 1
        if self._n == 0:
            self._width_s = self._initial_width_s  # regain resolution once empty

    def _coarsen(self) -> None:
        while len(self._counts) > self._max_buckets:
            merged: dict[int, int] = {}
            for b, c in self._counts.items():
                merged[b // 2] = merged.get(b // 2, 0) + c
            self._counts = merged
            self._width_s *= 2.0

    def age_quantiles(self, now_unix_s: float, qs: tuple[float, ...]) -> tuple[float, ...]:
        """Estimated ages (s) at quantiles ``qs`` (0..1, e.g. 0.99 = older than 99%).

        The age quantile q is the submit-time quantile 1 - q; each bucket stands for its
        midpoint. All zeros when empty.
        """
        if self._n == 0:
            return tuple(0.0 for _ in qs)
        buckets = sorted(self._counts.items())
        out = []
        for q in qs:
            # rank among submit times, oldest first, of the item with age quantile q
            rank = max(1, math.ceil((1.0 - q) * self._n))
            seen = 0
            t = buckets[-1][0]
            for b, c in buckets:
                seen += c
                if seen >= rank:
                    t = b
                    break
            mid = (t + 0.5) * self._width_s
            out.append(max(0.0, now_unix_s - mid))
        return tuple(out)
