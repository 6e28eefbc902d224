"""Samplers for the scenario's distributions: zero-argument callables on an injected rng.

Each sampler is built once per pool and called once per task. Draws come from numpy in
blocks of ``BLOCK`` (a ``numpy.random.Generator`` seeded from the injected
``random.Random``, so a run stays reproducible from its seed), and a sampler is
``next`` over a C-level chain of those blocks: about 40 ns a draw, where a Python-level
``random.Random`` draw costs 0.3-1.5 us and the simulator makes several per task.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from functools import partial
from itertools import chain
from typing import Any

import numpy as np

from fleet.sim.scenario import (
    ConstantCount,
    ConstantDuration,
    ExponentialDuration,
    GammaDuration,
    LLMDuration,
    LognormalCount,
    LognormalDuration,
    ParetoDuration,
    UniformCount,
    UniformDuration,
    WeibullDuration,
)

BLOCK = 4096


def _const(v: float) -> float:
    return v


def numpy_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator seeded from ``rng`` (one draw of 64 bits from it)."""
    return np.random.default_rng(rng.getrandbits(64))


def blocks(draw: Callable[[], Any]) -> Callable[[], Any]:
    """A sampler returning the items of ``draw()`` (a numpy array of ``BLOCK`` draws),
    one per call, drawing a new block when one runs out."""
    it: Iterator[Any] = chain.from_iterable(iter(lambda: draw().tolist(), None))
    return partial(next, it)


def duration_sampler(dist: object, rng: random.Random) -> Callable[[], float]:
    """A callable drawing one duration in seconds from ``dist``."""
    if isinstance(dist, ConstantDuration):
        return partial(_const, dist.value_s)
    if isinstance(dist, LLMDuration):
        draw = dist.latency_model().sampler(rng)  # as fleet.agents.llm.SimulatedLLM
        return lambda: draw()[0]
    g = numpy_rng(rng)
    if isinstance(dist, ExponentialDuration):
        return blocks(partial(g.exponential, dist.mean_s, BLOCK))
    if isinstance(dist, LognormalDuration):
        return blocks(partial(g.lognormal, math.log(dist.median_s), dist.sigma, BLOCK))
    if isinstance(dist, UniformDuration):
        return blocks(partial(g.uniform, dist.low_s, dist.high_s, BLOCK))
    if isinstance(dist, GammaDuration):
        shape = 1.0 / dist.cv**2
        return blocks(partial(g.gamma, shape, dist.mean_s / shape, BLOCK))
    if isinstance(dist, WeibullDuration):
        scale, shape = dist.scale_s, dist.shape
        return blocks(lambda: scale * g.weibull(shape, BLOCK))
    if isinstance(dist, ParetoDuration):
        # numpy's pareto is Lomax (Pareto II): x_m * (1 + it) is Pareto I from x_m.
        xm, alpha, cap = dist.scale_s, dist.alpha, dist.max_s or math.inf
        return blocks(lambda: np.minimum(cap, xm * (1.0 + g.pareto(alpha, BLOCK))))
    raise TypeError(f"no sampler for duration distribution {type(dist).__name__}")


def count_sampler(dist: object, rng: random.Random) -> Callable[[], int]:
    """A callable drawing one non-negative integer count (tokens) from ``dist``."""
    if isinstance(dist, ConstantCount):
        return partial(_const, dist.value)  # type: ignore[arg-type]
    g = numpy_rng(rng)
    if isinstance(dist, LognormalCount):
        mu, s = math.log(dist.median), dist.sigma
        # rounded to the nearest integer; a lognormal is never negative
        return blocks(lambda: np.rint(g.lognormal(mu, s, BLOCK)).astype(np.int64))
    if isinstance(dist, UniformCount):
        return blocks(partial(g.integers, dist.low, dist.high, BLOCK, endpoint=True))
    raise TypeError(f"no sampler for count distribution {type(dist).__name__}")
