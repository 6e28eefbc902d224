"""One backoff rule for retries, restarts and breakers' open durations."""

from __future__ import annotations

import random

import pytest

from fleet.policy.backoff import backoff_s
from fleet.policy.breaker import CircuitBreaker
from fleet.spec.backoff import BackoffSpec
from fleet.spec.health import RestartSpec
from fleet.spec.resilience import BreakerSpec, RetrySpec
from tests.utils import FakeClock


def test_retries_restarts_and_breakers_follow_the_same_rule():
    knobs = {"initial_backoff_s": 2, "backoff_multiplier": 3, "max_backoff_s": 50}
    plain = [backoff_s(BackoffSpec(**knobs, jitter_ratio=0), n, None) for n in range(1, 6)]
    assert plain == [2, 6, 18, 50, 50]
    for spec in (RetrySpec(**knobs, jitter_ratio=0), RestartSpec(**knobs, jitter_ratio=0)):
        assert [backoff_s(spec, n, None) for n in range(1, 6)] == plain
    breaker = CircuitBreaker(
        "b",
        BreakerSpec(open_duration_s=2, open_duration_multiplier=3, max_open_duration_s=50),
        FakeClock(),
    )
    assert [breaker.open_duration_s(n) for n in range(1, 6)] == plain
    assert breaker.open_duration_s(0) == 2


def test_zero_initial_backoff_stays_zero_and_jitter_needs_an_rng():
    spec = BackoffSpec(initial_backoff_s=0, max_backoff_s=10)
    assert backoff_s(spec, 5_000, random.Random(0)) == 0.0, "0 x a huge power is still 0"
    with pytest.raises(ValueError, match="needs an rng"):
        backoff_s(BackoffSpec(jitter_ratio=0.5), 1, None)
    with pytest.raises(ValueError, match="1-based"):
        backoff_s(BackoffSpec(), 0, None)
