"""Retries: backoff with jitter, attempt limits, what is retryable, and a retry budget.

Nothing here sleeps. The delay before the next attempt is fleet's one backoff rule
(``fleet.policy.backoff``: a pure function of the attempt number and an injected
``random.Random``, built from tenacity's wait strategies); the runtime schedules the
retry (e.g. re-enqueues the task with a not-before time).

``RetryBudget`` keeps retries to a share of live traffic over a sliding window, with a
floor so a quiet pool can still retry: when a pool struggles, its own retries must not
multiply the load it cannot handle (a retry storm). ``RetryPolicy.decide`` combines the
four rules into one decision.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from fleet.policy.backoff import attempt_state, backoff_wait
from fleet.policy.breaker import TimeBuckets
from fleet.spec.resilience import RetrySpec

Clock = Callable[[], float]

# "pkg.mod.ErrorName: message" (traceback.format_exception_only), or a bare class name.
_ERROR_NAME_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?::|$)")
# Failure reasons that are verdicts about the task, not accidents of the moment: never
# retried, even when ``retry_unknown_errors`` is on.
_NEVER_RETRY = frozenset(
    {
        "bad_output",
        "rejected",
        "validation",
        "deadline_exceeded",
        "budget_exhausted",
        "max_deliveries",
        "max_attempts",
        # A provider's answer that another attempt would get again (``fleet.llm``).
        "provider_auth",
        "provider_rejected",
        "provider_bad_response",
        "output_too_large",
    }
)


def error_name(error: str | None) -> str | None:
    """The exception class name at the start of a failure text, if there is one."""
    if not error:
        return None
    m = _ERROR_NAME_RE.match(error)
    return m.group(1) if m else None


def is_retryable(spec: RetrySpec, reason: str | None, error: str | None = None) -> bool:
    """Whether a failure may succeed on another attempt.

    ``reason`` is the outcome's failure reason (``timeout``, ``error``, ...), ``error``
    its text, which for an agent's exception starts with the exception class (possibly
    module-qualified, matched on the full and the bare name). Non-retryable errors win
    over retryable reasons: a validation error is not cured by time.
    """
    name = error_name(error)
    names = {name, name.rsplit(".", 1)[-1]} if name else set()
    if names & set(spec.non_retryable_errors):
        return False
    if reason in spec.retryable_reasons or names & set(spec.retryable_errors):
        return True
    return spec.retry_unknown_errors and reason not in _NEVER_RETRY


class RetryBudget:
    """Retries at most ``budget_ratio`` of live traffic over a sliding window, plus a floor.

    Count every first attempt with ``record_request``; ask ``try_spend`` before each
    retry (True: go ahead, and it is counted). Over the last ``budget_window_s`` seconds
    the retries allowed are ``budget_ratio * requests + min_retries_per_s *
    budget_window_s``. ``clock`` returns monotonic seconds.
    """

    def __init__(self, spec: RetrySpec, clock: Clock):
        self.spec = spec
        self._clock = clock
        self._counts = TimeBuckets(spec.budget_window_s, 2)  # requests, retries
        self.denied = 0

    def record_request(self, n: int = 1) -> None:
        self._counts.add(self._clock(), n, 0)

    def available(self) -> float:
        """Retries that may still be spent in the current window."""
        requests, retries = self._counts.sums(self._clock())
        return self.spec.budget_ratio * requests + self.spec.budget_floor - retries

    def try_spend(self) -> bool:
        if self.available() >= 1:
            self._counts.add(self._clock(), 0, 1)
            return True
        self.denied += 1
        return False

    def snapshot(self) -> dict[str, float]:
        requests, retries = self._counts.sums(self._clock())
        return {
            "requests": requests,
            "retries": retries,
            "available": self.available(),
            "denied": self.denied,
        }


class RetryVerdict(str, Enum):
    RETRY = "retry"
    NOT_RETRYABLE = "not_retryable"
    MAX_ATTEMPTS = "max_attempts"
    DEADLINE = "deadline"  # the next attempt could not start before the deadline
    BUDGET_EXHAUSTED = "retry_budget_exhausted"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether to retry, after how many seconds, and why (``verdict``)."""

    retry: bool
    delay_s: float
    verdict: RetryVerdict


class RetryPolicy:
    """The retry rules of one pool, in one call.

    Use one per pool next to where failures are seen: ``record_request()`` for every
    first attempt, ``decide(...)`` for every failure. ``clock`` is monotonic seconds,
    ``rng`` the jitter source.
    """

    def __init__(
        self,
        spec: RetrySpec,
        clock: Clock,
        rng: random.Random,
        budget: RetryBudget | None = None,
    ):
        self.spec = spec
        self.rng = rng
        self.budget = budget or RetryBudget(spec, clock)
        self._wait = backoff_wait(spec, rng)

    def record_request(self, n: int = 1) -> None:
        self.budget.record_request(n)

    def max_attempts(self, task_max_attempts: int | None = None) -> int:
        """A task may ask for fewer attempts than the pool allows, not more."""
        if task_max_attempts is None:
            return self.spec.max_attempts
        return max(1, min(task_max_attempts, self.spec.max_attempts))

    def decide(
        self,
        attempt: int,
        reason: str | None,
        error: str | None = None,
        *,
        task_max_attempts: int | None = None,
        time_left_s: float | None = None,
    ) -> RetryDecision:
        """After failed attempt ``attempt`` (1-based): retry, and after how long?

        ``time_left_s`` is the time until the task's deadline, if it has one. The budget
        is only charged when the answer is to retry.
        """
        if not is_retryable(self.spec, reason, error):
            return RetryDecision(False, 0.0, RetryVerdict.NOT_RETRYABLE)
        if attempt >= self.max_attempts(task_max_attempts):
            return RetryDecision(False, 0.0, RetryVerdict.MAX_ATTEMPTS)
        delay = self._wait(attempt_state(attempt))
        if time_left_s is not None and delay >= time_left_s:
            return RetryDecision(False, delay, RetryVerdict.DEADLINE)
        if not self.budget.try_spend():
            return RetryDecision(False, delay, RetryVerdict.BUDGET_EXHAUSTED)
        return RetryDecision(True, delay, RetryVerdict.RETRY)
