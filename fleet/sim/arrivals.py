"""Arrival processes: each stream yields its next arrival time on demand.

A stream is asked ``next_after(t)`` once per arrival, so generating arrivals costs one
draw each and no memory: a million tasks never exist as a list.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from functools import partial
from itertools import accumulate

from fleet.sim.distributions import BLOCK, blocks, numpy_rng
from fleet.sim.scenario import Burst, PoissonArrivals, RandomBursts, StreamSpec, TraceArrivals


class _RandomBurstTimeline:
    """Burst windows of a Markov-modulated process, drawn lazily as time advances."""

    def __init__(self, spec: RandomBursts, rng: random.Random):
        self.spec = spec
        self.rng = rng
        self.windows: list[tuple[float, float]] = []
        self._t = 0.0

    def multiplier(self, t: float) -> float:
        spec, rng = self.spec, self.rng
        while self._t <= t:
            start = self._t + rng.expovariate(1.0 / spec.mean_gap_s)
            end = start + rng.expovariate(1.0 / spec.mean_duration_s)
            self.windows.append((start, end))
            self._t = end
        # Only the last couple of windows can contain t (time moves forward).
        for start, end in reversed(self.windows[-2:]):
            if start <= t < end:
                return spec.multiplier
        return 1.0


def _burst_multiplier(b: Burst, t: float) -> float:
    if t < b.start_s or t >= b.start_s + b.duration_s:
        return 1.0
    x = t - b.start_s
    if b.ramp_s > 0:
        if x < b.ramp_s:
            return 1.0 + (b.multiplier - 1.0) * x / b.ramp_s
        left = b.duration_s - x
        if left < b.ramp_s:
            return 1.0 + (b.multiplier - 1.0) * left / b.ramp_s
    return b.multiplier


class PoissonStream:
    """(Non-homogeneous) Poisson arrivals.

    The rate is held constant over steps of ``rate_step_s`` (evaluated at each step's
    midpoint). Within a step arrivals are exactly Poisson; since the exponential is
    memoryless, a draw that overshoots the step's end is discarded and drawing restarts
    at the boundary with the next step's rate, which is exact for a piecewise-constant
    rate (no thinning, so one draw per arrival when the rate is steady).
    """

    def __init__(self, spec: PoissonArrivals, rng: random.Random, horizon_s: float):
        self.spec = spec
        # Exponential(rate) is Exp(1) / rate: standard draws in blocks from numpy.
        g = numpy_rng(rng)
        self._exp1 = blocks(partial(g.standard_exponential, BLOCK))
        self._horizon = horizon_s
        self._step = spec.rate_step_s
        self._k = -1
        self._rate = spec.rate_per_s
        self._shaped = spec.shaped
        self._random = (
            _RandomBurstTimeline(spec.random_bursts, rng)
            if spec.random_bursts is not None
            else None
        )
        if spec.rate_per_s == 0:
            # Zero base rate: nothing ever arrives (bursts multiply the rate).
            self._horizon = -1.0

    @property
    def random_burst_windows(self) -> list[tuple[float, float]]:
        return self._random.windows if self._random is not None else []

    def rate_at(self, t: float) -> float:
        spec = self.spec
        r = spec.rate_per_s
        d = spec.diurnal
        if d is not None:
            r *= 1.0 + d.amplitude * math.cos(2 * math.pi * (t - d.peak_s) / d.period_s)
        for b in spec.bursts:
            r *= _burst_multiplier(b, t)
        if self._random is not None:
            r *= self._random.multiplier(t)
        return r

    def next_after(self, t: float) -> float | None:
        if t > self._horizon:
            return None
        if not self._shaped:
            return t + self._exp1() / self._rate
        step = self._step
        k = int(t // step)
        if k < self._k:
            k = self._k
        while True:
            if k != self._k:
                self._k = k
                self._rate = self.rate_at((k + 0.5) * step)
            end = (k + 1) * step
            if self._rate > 0:
                nt = t + self._exp1() / self._rate
                if nt < end:
                    return nt
            # Step index advances explicitly, so float rounding at a boundary can
            # never make the loop revisit the same step.
            k += 1
            t = end
            if t > self._horizon:
                return None


class TraceStream:
    """Arrivals at the timestamps of a trace file (already validated as ordered)."""

    def __init__(self, spec: TraceArrivals):
        self._times = spec.times
        self._scale = spec.time_scale
        self._i = 0

    def next_after(self, t: float) -> float | None:
        i = self._i
        if i >= len(self._times):
            return None
        self._i = i + 1
        return self._times[i] * self._scale


class TenantPicker:
    """Draws the tenant of each task from the stream's weights (one draw per task)."""

    def __init__(self, ids: list[int], weights: list[float], rng: random.Random):
        self.ids = ids
        total = sum(weights)
        self._cum = [w / total for w in accumulate(weights)]
        self._rand = rng.random
        self.single = ids[0] if len(ids) == 1 else None

    def pick(self) -> int:
        if self.single is not None:
            return self.single
        return self.ids[min(bisect_right(self._cum, self._rand()), len(self.ids) - 1)]


def make_stream(
    spec: StreamSpec, rng: random.Random, horizon_s: float
) -> PoissonStream | TraceStream:
    if isinstance(spec.arrivals, TraceArrivals):
        return TraceStream(spec.arrivals)
    return PoissonStream(spec.arrivals, rng, horizon_s)
