"""Samplers for the scenario's distributions: zero-argument callables on an injected rng.

Each sampler is built once per pool and called once per task, so it is a bound method
or a ``functools.partial`` where the distribution allows (no per-call dispatch on the
kind, no objects created per draw).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import partial

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


def _const(v: float) -> float:
    return v


def duration_sampler(dist: object, rng: random.Random) -> Callable[[], float]:
    """A callable drawing one duration in seconds from ``dist``."""
    if isinstance(dist, ConstantDuration):
        return partial(_const, dist.value_s)
    if isinstance(dist, ExponentialDuration):
        return partial(rng.expovariate, 1.0 / dist.mean_s)
    if isinstance(dist, LognormalDuration):
        # exp of Random.gauss (Box-Muller, two normals per pair of uniforms) is about
        # twice as fast as Random.lognormvariate (Kinderman-Monahan), same distribution.
        g, exp, mu, s = rng.gauss, math.exp, math.log(dist.median_s), dist.sigma
        return lambda: exp(g(mu, s))
    if isinstance(dist, UniformDuration):
        return partial(rng.uniform, dist.low_s, dist.high_s)
    if isinstance(dist, GammaDuration):
        shape = 1.0 / dist.cv**2
        return partial(rng.gammavariate, shape, dist.mean_s / shape)
    if isinstance(dist, WeibullDuration):
        return partial(rng.weibullvariate, dist.scale_s, dist.shape)
    if isinstance(dist, ParetoDuration):
        xm, alpha, cap = dist.scale_s, dist.alpha, dist.max_s or math.inf
        pv = rng.paretovariate
        return lambda: min(cap, xm * pv(alpha))
    if isinstance(dist, LLMDuration):
        draw = dist.latency_model().sampler(rng)  # as fleet.agents.llm.SimulatedLLM
        return lambda: draw()[0]
    raise TypeError(f"no sampler for duration distribution {type(dist).__name__}")


def count_sampler(dist: object, rng: random.Random) -> Callable[[], int]:
    """A callable drawing one non-negative integer count (tokens) from ``dist``."""
    if isinstance(dist, ConstantCount):
        return partial(_const, dist.value)  # type: ignore[arg-type]
    if isinstance(dist, LognormalCount):
        mu, s, g, exp = math.log(dist.median), dist.sigma, rng.gauss, math.exp
        return lambda: int(exp(g(mu, s)) + 0.5)  # rounded; a lognormal is never negative
    if isinstance(dist, UniformCount):
        return partial(rng.randint, dist.low, dist.high)
    raise TypeError(f"no sampler for count distribution {type(dist).__name__}")
