"""Adaptive batch size from queue depth, item size and the measured cost of a call.

Pure. The dispatcher measures each call (items, bytes, seconds) into a
``CallCostEstimator`` and, before leasing, asks ``choose_batch_size`` how many items the
next call should carry.

Cost model: a call carrying n items of b bytes each takes
``overhead_s + n * (per_item_s + b * per_byte_s)``. The overhead (serialization, actor
hop, scheduling) is paid once per call, so batching amortizes it; the per-item part is
not reduced by batching, it only makes the last item of a batch wait for the others.

Decision, in order:

1. Nothing visible or no free capacity: 0.
2. ``available = min(depth, free_capacity)``; a shallow queue sends what it has (a
   single item when depth is 1): an item never waits for a batch to fill.
3. The smallest batch that keeps the overhead at most ``max_overhead_share`` of a call:
   ``n_amortize = ceil(overhead * (1 - share) / (share * unit))``, unit being the
   per-item seconds at this item size. Small cheap items give a large n_amortize; an
   item whose own cost dwarfs the overhead gives 1 (it travels alone).
4. A deep queue is split over ``target_batches_in_flight`` concurrent calls, but no
   batch is made smaller than n_amortize: ``max(n_amortize, ceil(available / k))``.
5. Bounds: ``max_items``, ``max_bytes`` (an item of more than half of it goes alone),
   and optionally ``max_call_s`` (the batch must finish within that many seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_OVERHEAD_SHARE = 0.1
DEFAULT_FORGET = 0.98
DEFAULT_RIDGE = 1e-3
DEFAULT_MIN_CALLS = 8


@dataclass(frozen=True, slots=True)
class CallCost:
    """Seconds per call: ``overhead_s`` once, plus per item and per payload byte."""

    overhead_s: float
    per_item_s: float
    per_byte_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.overhead_s, self.per_item_s, self.per_byte_s) < 0:
            raise ValueError(f"call costs must be >= 0, got {self}")

    def seconds(self, items: int, item_bytes: float) -> float:
        return self.overhead_s + items * (self.per_item_s + item_bytes * self.per_byte_s)


@dataclass(frozen=True, slots=True)
class BatchChoice:
    """How many items the next call carries, and which rule set that number."""

    size: int
    bound: str  # "empty", "available", "amortize", "spread", "max_items", "max_bytes",
    #             "max_call_s"


def choose_batch_size(
    depth: int,
    avg_item_bytes: float,
    cost: CallCost,
    *,
    free_capacity: int,
    max_items: int,
    max_bytes: int,
    target_batches_in_flight: int = 1,
    max_overhead_share: float = DEFAULT_MAX_OVERHEAD_SHARE,
    max_call_s: float | None = None,
) -> BatchChoice:
    """The size of the next batch (see the module docstring for the rules)."""
    if not 0 < max_overhead_share < 1:
        raise ValueError(f"max_overhead_share must be in (0, 1), got {max_overhead_share}")
    if max_items < 1 or max_bytes < 1 or target_batches_in_flight < 1:
        raise ValueError(
            f"max_items ({max_items}), max_bytes ({max_bytes}) and "
            f"target_batches_in_flight ({target_batches_in_flight}) must be >= 1"
        )
    available = min(depth, free_capacity)
    if available <= 0:
        return BatchChoice(0, "empty")
    item_bytes = max(float(avg_item_bytes), 1.0)
    unit_s = cost.per_item_s + item_bytes * cost.per_byte_s
    if unit_s <= 0:
        n_amortize = max_items
    else:
        share = max_overhead_share
        n_amortize = max(1, math.ceil(cost.overhead_s * (1 - share) / (share * unit_s)))
    spread = math.ceil(available / target_batches_in_flight)
    candidates = [
        (available, "available"),
        (max(n_amortize, spread), "amortize" if n_amortize > spread else "spread"),
        (max_items, "max_items"),
        (max(1, int(max_bytes // item_bytes)), "max_bytes"),
    ]
    if max_call_s is not None and unit_s > 0:
        candidates.append(
            (max(1, math.floor((max_call_s - cost.overhead_s) / unit_s)), "max_call_s")
        )
    size, bound = min(candidates, key=lambda c: c[0])
    return BatchChoice(max(1, size), bound)


class CallCostEstimator:
    """Online fit of ``seconds = overhead + per_item * items + per_byte * bytes``.

    Weighted least squares with exponential forgetting (weight ``forget ** age`` in
    calls), so the estimate follows a drifting cost; a small ridge pull toward the
    ``prior`` keeps it defined when the calls do not vary enough to separate the terms
    (e.g. every item the same size makes bytes and items collinear: the split between
    them then stays the prior's). Negative coefficients are clamped to 0. Until
    ``min_calls`` calls are seen, ``estimate`` returns the prior.
    """

    def __init__(
        self,
        prior: CallCost,
        forget: float = DEFAULT_FORGET,
        ridge: float = DEFAULT_RIDGE,
        min_calls: int = DEFAULT_MIN_CALLS,
    ):
        if not 0 < forget <= 1:
            raise ValueError(f"forget must be in (0, 1], got {forget}")
        self.prior = prior
        self.forget = forget
        self.ridge = ridge
        self.min_calls = min_calls
        self.calls = 0
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3

    def observe(self, items: int, nbytes: int, seconds: float) -> None:
        """Record one call that carried ``items`` items, ``nbytes`` bytes in total."""
        if items < 0 or nbytes < 0 or seconds < 0:
            raise ValueError(
                f"a call cannot have negative items ({items}), bytes "
                f"({nbytes}) or seconds ({seconds})"
            )
        x = (1.0, float(items), float(nbytes))
        f = self.forget
        for i in range(3):
            self._xty[i] = f * self._xty[i] + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = f * self._xtx[i][j] + x[i] * x[j]
        self.calls += 1

    def estimate(self) -> CallCost:
        if self.calls < self.min_calls:
            return self.prior
        p = (self.prior.overhead_s, self.prior.per_item_s, self.prior.per_byte_s)
        a = [row[:] for row in self._xtx]
        b = self._xty[:]
        for j in range(3):
            lam = self.ridge * max(a[j][j], 1e-300)  # relative: scale-free per feature
            a[j][j] += lam
            b[j] += lam * p[j]
        theta = _solve3(a, b)
        if theta is None:
            return self.prior
        return CallCost(*(max(0.0, t) for t in theta))


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float] | None:
    """Gaussian elimination with partial pivoting; None if singular."""
    m = [a[i][:] + [b[i]] for i in range(3)]
    for c in range(3):
        piv = max(range(c, 3), key=lambda r: abs(m[r][c]))
        if abs(m[piv][c]) < 1e-300:
            return None
        m[c], m[piv] = m[piv], m[c]
        for r in range(c + 1, 3):
            f = m[r][c] / m[c][c]
            for k in range(c, 4):
                m[r][k] -= f * m[c][k]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][k] * x[k] for k in range(r + 1, 3))) / m[r][r]
    return x[0], x[1], x[2]
