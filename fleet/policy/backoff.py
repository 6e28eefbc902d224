"""Backoff: the one rule for how long to wait before trying again.

Task retries (``fleet.policy.retry``), agent restarts (``fleet.policy.health``) and
circuit breakers' open durations (``fleet.policy.breaker``) all take their delays from
``backoff_s`` / ``backoff_wait`` and a ``fleet.spec.backoff.BackoffSpec``: try ``n``
(1-based) waits ``min(initial_backoff_s * backoff_multiplier ** (n - 1),
max_backoff_s)`` seconds less a random share up to ``jitter_ratio`` of it.

Built from tenacity's wait strategies (``wait_exponential`` for the capped exponential,
wrapped in ``wait_jittered`` for the jitter), so ``backoff_wait`` also plugs straight
into a ``tenacity.Retrying`` inside an agent. Pure: nothing sleeps or reads a clock, and
the jitter comes from an injected ``random.Random`` (same state, same delay). A spec
without jitter draws nothing, so it needs no ``rng``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NamedTuple, cast

from tenacity.wait import wait_base, wait_exponential, wait_none

from fleet.spec.backoff import BackoffSpec

if TYPE_CHECKING:
    from tenacity import RetryCallState


class _Attempt(NamedTuple):
    # tenacity's wait strategies read only ``attempt_number`` from the retry state; a
    # real RetryCallState would read time.monotonic() when built.
    attempt_number: int


def attempt_state(attempt: int) -> RetryCallState:
    """A stand-in for tenacity's retry state at try ``attempt`` (1-based), for calling a
    wait strategy directly."""
    return cast("RetryCallState", _Attempt(attempt))


class wait_jittered(wait_base):  # lower case: tenacity's naming
    """Take a random share, up to ``ratio``, off another wait strategy's delay.

    ``ratio`` 1 is "full jitter" (uniform in [0, delay]), 0.5 "equal jitter", 0 none.
    The randomness comes from the injected ``rng``, never from the global generator.
    """

    def __init__(self, base: wait_base, ratio: float, rng: random.Random):
        self.base = base
        self.ratio = ratio
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self.base(retry_state)
        return delay * (1.0 - self.ratio * self.rng.random())


def backoff_wait(spec: BackoffSpec, rng: random.Random | None) -> wait_base:
    """The spec's backoff as a tenacity wait strategy (seconds).

    ``rng`` draws the jitter; it may be None only when ``spec.jitter_ratio`` is 0.
    """
    if spec.initial_backoff_s == 0:
        # Not wait_exponential(multiplier=0): past ~1,000 tries its float overflows and
        # tenacity answers the cap, where 0 x anything is 0.
        return wait_none()
    exp = wait_exponential(
        multiplier=spec.initial_backoff_s,
        max=spec.max_backoff_s,
        exp_base=spec.backoff_multiplier,
    )
    if spec.jitter_ratio == 0:
        return exp
    if rng is None:
        raise ValueError(f"jitter_ratio {spec.jitter_ratio} needs an rng to draw from")
    return wait_jittered(exp, spec.jitter_ratio, rng)


def backoff_s(spec: BackoffSpec, attempt: int, rng: random.Random | None) -> float:
    """Seconds to wait after failed try number ``attempt`` (1-based): see the module
    docstring. The same ``rng`` state gives the same delay."""
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    return backoff_wait(spec, rng)(attempt_state(attempt))


__all__ = ["attempt_state", "backoff_s", "backoff_wait", "wait_jittered"]
