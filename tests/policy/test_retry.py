"""Retries without sleeping: backoff as a function of the attempt and an injected rng,
retryable classification, attempt limits, deadlines, and the retry budget on a virtual
clock."""

from __future__ import annotations

import random

import pytest
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential

from fleet.policy.backoff import backoff_s, backoff_wait
from fleet.policy.retry import (
    RetryBudget,
    RetryPolicy,
    RetryVerdict,
    error_name,
    is_retryable,
)
from fleet.spec import SpecError, parse_spec
from fleet.spec.resilience import RetrySpec
from tests.utils import FakeClock, pool

# --- backoff ---------------------------------------------------------------------------


def test_backoff_without_jitter_is_tenacity_exponential_capped():
    spec = RetrySpec(
        initial_backoff_s=0.1, backoff_multiplier=2, max_backoff_s=1.0, jitter_ratio=0
    )
    rng = random.Random(0)
    delays = [backoff_s(spec, n, rng) for n in range(1, 8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert backoff_s(spec, 10_000, rng) == 1.0  # no overflow for huge attempt numbers
    ref = wait_exponential(multiplier=0.1, max=1.0, exp_base=2)
    assert isinstance(backoff_wait(spec, rng), type(ref))


def test_full_jitter_stays_under_the_exponential_and_is_reproducible():
    spec = RetrySpec(
        initial_backoff_s=1, backoff_multiplier=2, max_backoff_s=30, jitter_ratio=1.0
    )
    a = [backoff_s(spec, n, random.Random(7)) for n in range(1, 7)]
    b = [backoff_s(spec, n, random.Random(7)) for n in range(1, 7)]
    assert a == b, "same rng state, same delays"
    rng = random.Random(1)
    for n in range(1, 7):
        cap = min(2 ** (n - 1), 30)
        draws = [backoff_s(spec, n, rng) for _ in range(500)]
        assert all(0 <= d <= cap for d in draws)
        assert min(draws) < 0.1 * cap and max(draws) > 0.9 * cap  # spread over the range


def test_equal_jitter_keeps_at_least_half_the_delay():
    spec = RetrySpec(initial_backoff_s=4, max_backoff_s=4, jitter_ratio=0.5)
    rng = random.Random(2)
    draws = [backoff_s(spec, 1, rng) for _ in range(500)]
    assert all(2 <= d <= 4 for d in draws)


def test_backoff_wait_works_inside_tenacity_retrying_with_a_fake_sleep():
    spec = RetrySpec(initial_backoff_s=0.5, max_backoff_s=2, jitter_ratio=0)
    slept: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        raise TimeoutError("upstream slow")

    retrying = Retrying(
        wait=backoff_wait(spec, random.Random(0)),
        stop=stop_after_attempt(4),
        sleep=slept.append,
        retry=retry_if_exception_type(TimeoutError),
    )
    with pytest.raises(RetryError):
        retrying(flaky)
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]


# --- classification --------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason,error,expected",
    [
        ("timeout", "exceeded task_timeout_s=30", True),
        ("upstream", None, True),
        ("error", "TimeoutError: read timed out", True),
        ("error", "openai.RateLimitError: slow down", True),  # module-qualified
        ("error", "ValueError: order id must be positive", False),
        ("error", "pydantic_core._pydantic_core.ValidationError: 1 validation error", False),
        ("timeout", "ValueError: bad input", False),  # a validation error wins over the reason
        ("error", "RuntimeError: flaky agent", True),  # unknown: retry_unknown_errors default
        ("bad_output", "output is not JSON", False),
        ("deadline_exceeded", None, False),
        ("max_deliveries", None, False),
    ],
)
def test_retryable_classification(reason, error, expected):
    assert is_retryable(RetrySpec(), reason, error) is expected


def test_unknown_errors_can_be_made_final_and_lists_extended():
    spec = RetrySpec(retry_unknown_errors=False, retryable_errors=("FlakyError",))
    assert not is_retryable(spec, "error", "RuntimeError: boom")
    assert is_retryable(spec, "error", "myagents.FlakyError: again")
    assert error_name("KeyError: 'x'") == "KeyError"
    assert error_name("not an exception text") is None


# --- the policy ------------------------------------------------------------------------


def policy(clock=None, **kw) -> RetryPolicy:
    spec = RetrySpec(
        **{
            "max_attempts": 3,
            "initial_backoff_s": 1,
            "max_backoff_s": 8,
            "jitter_ratio": 0,
            "budget_ratio": 0.5,
            "min_retries_per_s": 0,
            **kw,
        }
    )
    return RetryPolicy(spec, clock or FakeClock(0), random.Random(0))


def test_attempt_limits_per_pool_and_per_task():
    p = policy()
    p.record_request(100)
    d = p.decide(1, "timeout")
    assert d.retry and d.delay_s == 1 and d.verdict is RetryVerdict.RETRY
    assert p.decide(2, "timeout").delay_s == 2
    assert p.decide(3, "timeout").verdict is RetryVerdict.MAX_ATTEMPTS
    assert p.decide(1, "timeout", task_max_attempts=1).verdict is RetryVerdict.MAX_ATTEMPTS
    # a task may not ask for more than the pool allows
    assert p.decide(3, "timeout", task_max_attempts=10).verdict is RetryVerdict.MAX_ATTEMPTS
    assert p.decide(1, "error", "ValueError: x").verdict is RetryVerdict.NOT_RETRYABLE


def test_no_retry_that_could_not_start_before_the_deadline():
    p = policy()
    p.record_request(100)
    assert p.decide(2, "timeout", time_left_s=1.5).verdict is RetryVerdict.DEADLINE
    assert p.decide(2, "timeout", time_left_s=2.5).retry
    assert p.budget.snapshot()["retries"] == 1, "a refused retry is not charged"


# --- the budget ------------------------------------------------------------------------


def test_budget_allows_a_share_of_live_traffic_then_refuses():
    clock = FakeClock(0)
    b = RetryBudget(
        RetrySpec(budget_ratio=0.2, budget_window_s=10, min_retries_per_s=0), clock
    )
    b.record_request(100)
    granted = sum(b.try_spend() for _ in range(50))
    assert granted == 20 and b.denied == 30
    b.record_request(10)  # more live traffic earns more retries
    assert sum(b.try_spend() for _ in range(10)) == 2


def test_budget_floor_lets_a_quiet_pool_retry():
    clock = FakeClock(0)
    b = RetryBudget(
        RetrySpec(budget_ratio=0.1, budget_window_s=10, min_retries_per_s=0.5), clock
    )
    assert sum(b.try_spend() for _ in range(20)) == 5  # 0.5/s x 10 s, no traffic at all
    b.record_request(30)
    assert sum(b.try_spend() for _ in range(20)) == 3


def test_budget_window_slides_and_refills():
    clock = FakeClock(0)
    spec = RetrySpec(budget_ratio=0.5, budget_window_s=10, min_retries_per_s=0)
    b = RetryBudget(spec, clock)
    b.record_request(10)
    assert sum(b.try_spend() for _ in range(10)) == 5
    clock.advance(5)
    assert not b.try_spend(), "the old requests and retries are both still in the window"
    clock.advance(6)  # both aged out: without new traffic there is nothing to spend
    assert not b.try_spend()
    b.record_request(4)
    assert sum(b.try_spend() for _ in range(10)) == 2


def test_retry_storm_is_capped_at_the_budget_share_over_time():
    """Every task fails (a struggling pool): retries stay near the budget share of the
    first attempts instead of multiplying them by max_attempts - 1."""
    clock = FakeClock(0)
    p = policy(
        clock, max_attempts=5, budget_ratio=0.1, budget_window_s=10, min_retries_per_s=1.0
    )
    first = retries = 0
    for _ in range(6_000):  # 100 tasks/s for 60 s
        clock.advance(0.01)
        p.record_request()
        first += 1
        attempt = 1
        while p.decide(attempt, "upstream").retry:
            retries += 1
            attempt += 1
    allowed = 0.1 * first + 1.0 * 60  # share + floor, summed over the 6 windows
    print(f"first attempts={first} retries={retries} allowed<={allowed:.0f}")
    assert retries <= allowed * 1.1
    assert retries >= 0.1 * first * 0.9, "the budget is actually used"
    assert p.budget.denied > 0


# --- spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "retry,path,needle",
    [
        ({"max_attempts": 0}, "resilience.retry.max_attempts", "greater than or equal to 1"),
        ({"budget_ratio": 1.5}, "resilience.retry.budget_ratio", "1.5 is outside [0, 1]"),
        ({"jitter_ratio": -0.1}, "resilience.retry.jitter_ratio", "outside [0, 1]"),
        (
            {"initial_backoff_s": 5, "max_backoff_s": 1},
            "resilience.retry",
            "max_backoff_s (1.0) must be >= initial_backoff_s (5.0)",
        ),
        ({"retryable_errors": ["ValueError"]}, "resilience.retry", "listed in both"),
        (
            {"backoff_multiplier": 0.5},
            "resilience.retry.backoff_multiplier",
            "greater than or equal to 1",
        ),
    ],
)
def test_bad_retry_spec_names_the_field(retry, path, needle):
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool()], "resilience": {"retry": retry}})
    errs = dict(exc.value.errors)
    assert path in errs, errs
    assert needle in errs[path], errs[path]
