"""Resilience section: time limits, circuit breakers, ejection limits and retries.

``task_timeout_s`` and ``max_deliveries`` govern one task's executions; ``agent_breaker``
and ``dependency_breaker(s)`` configure the circuit breakers of ``fleet.policy.breaker``;
``ejection`` bounds how much of a pool breakers may take out of service at once; ``retry``
configures the backoff, attempt limit, classification and budget of
``fleet.policy.retry``.
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel
from fleet.spec._types import Share, UnitFraction
from fleet.spec.backoff import BackoffSpec

DEFAULT_TASK_TIMEOUT_S = 300.0
DEFAULT_MAX_DELIVERIES = 5

DEFAULT_BREAKER_WINDOW_CALLS = 100
DEFAULT_BREAKER_WINDOW_S = 60.0
DEFAULT_BREAKER_MIN_CALLS = 20
DEFAULT_FAILURE_RATE_THRESHOLD = 0.5
DEFAULT_SLOW_CALL_RATE_THRESHOLD = 1.0  # only a window where every call is slow trips
DEFAULT_SLOW_CALL_DURATION_S = 30.0
DEFAULT_OPEN_DURATION_S = 30.0
DEFAULT_OPEN_DURATION_MULTIPLIER = 2.0
DEFAULT_MAX_OPEN_DURATION_S = 300.0
DEFAULT_TRIP_MEMORY_S = 600.0
DEFAULT_HALF_OPEN_PROBE_CALLS = 3
DEFAULT_HALF_OPEN_MAX_WAIT_S = 60.0

DEFAULT_MAX_EJECTED_SHARE = 0.1
DEFAULT_PANIC_THRESHOLD = 0.5

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BUDGET_RATIO = 0.2
DEFAULT_RETRY_BUDGET_WINDOW_S = 10.0
DEFAULT_MIN_RETRIES_PER_S = 1.0

# Failure reasons (``Outcome.reason``) worth another attempt: the fault lies with the
# agent, host or a downstream service at that moment, not with the task itself.
DEFAULT_RETRYABLE_REASONS = (
    "timeout",
    "upstream",
    "unavailable",
    "overloaded",
    "rate_limited",
    "host_died",
    "provider_unreachable",
)
# Exception class names (from the failure text) that are transient, and ones that will
# fail again however often they are retried.
DEFAULT_RETRYABLE_ERRORS = (
    "TimeoutError",
    "asyncio.TimeoutError",
    "ConnectionError",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "BrokenPipeError",
    "UpstreamError",
    "ServiceUnavailable",
    "RateLimitError",
    "APIConnectionError",
    "APITimeoutError",
    "InternalServerError",
    "DependencyUnavailable",
)
DEFAULT_NON_RETRYABLE_ERRORS = (
    "ValueError",
    "TypeError",
    "KeyError",
    "AttributeError",
    "ValidationError",
    "TaskRejected",
    "NotImplementedError",
    "PermissionError",
    "BadRequestError",
)


class WindowKind(str, Enum):
    COUNT = "count"  # the last ``window_calls`` calls
    TIME = "time"  # the calls of the last ``window_s`` seconds


class BreakerSpec(SpecModel):
    """One circuit breaker: when it opens, how long it stays open, how it probes.

    The breaker watches a sliding window (the last ``window_calls`` calls, or the calls
    of the last ``window_s`` seconds). Once the window holds at least ``min_calls``
    calls, it opens when the share of failures reaches ``failure_rate_threshold`` or the
    share of calls slower than ``slow_call_duration_s`` reaches
    ``slow_call_rate_threshold``. It stays open ``open_duration_s``, multiplied by
    ``open_duration_multiplier`` for each further trip within ``trip_memory_s`` of the
    last, up to ``max_open_duration_s`` (the ``BackoffSpec`` rule without jitter,
    ``open_backoff``); then it lets ``half_open_probe_calls`` calls
    through: all succeed and it closes, one fails (or they do not all finish within
    ``half_open_max_wait_s``) and it opens again.
    """

    enabled: bool = True
    window: WindowKind = WindowKind.COUNT
    window_calls: int = Field(default=DEFAULT_BREAKER_WINDOW_CALLS, ge=1)
    window_s: float = Field(default=DEFAULT_BREAKER_WINDOW_S, gt=0, allow_inf_nan=False)
    min_calls: int = Field(default=DEFAULT_BREAKER_MIN_CALLS, ge=1)
    failure_rate_threshold: Share = DEFAULT_FAILURE_RATE_THRESHOLD
    slow_call_rate_threshold: Share = DEFAULT_SLOW_CALL_RATE_THRESHOLD
    slow_call_duration_s: float = Field(default=DEFAULT_SLOW_CALL_DURATION_S, gt=0)
    open_duration_s: float = Field(default=DEFAULT_OPEN_DURATION_S, gt=0, allow_inf_nan=False)
    open_duration_multiplier: float = Field(
        default=DEFAULT_OPEN_DURATION_MULTIPLIER, ge=1, allow_inf_nan=False
    )
    max_open_duration_s: float = Field(
        default=DEFAULT_MAX_OPEN_DURATION_S, gt=0, allow_inf_nan=False
    )
    trip_memory_s: float = Field(default=DEFAULT_TRIP_MEMORY_S, ge=0)
    half_open_probe_calls: int = Field(default=DEFAULT_HALF_OPEN_PROBE_CALLS, ge=1)
    half_open_max_wait_s: float = Field(default=DEFAULT_HALF_OPEN_MAX_WAIT_S, gt=0)

    @model_validator(mode="after")
    def _check(self) -> BreakerSpec:
        if self.max_open_duration_s < self.open_duration_s:
            raise ValueError(
                f"max_open_duration_s ({self.max_open_duration_s}) must be >= "
                f"open_duration_s ({self.open_duration_s})"
            )
        if self.window is WindowKind.COUNT and self.min_calls > self.window_calls:
            raise ValueError(
                f"min_calls ({self.min_calls}) must be <= window_calls ({self.window_calls}): "
                "a count window never holds more calls than its size, so it could never trip"
            )
        return self

    @property
    def open_backoff(self) -> BackoffSpec:
        """How long the breaker stays open, trip after trip, as a backoff."""
        return BackoffSpec(
            initial_backoff_s=self.open_duration_s,
            max_backoff_s=self.max_open_duration_s,
            backoff_multiplier=self.open_duration_multiplier,
            jitter_ratio=0.0,
        )


class EjectionSpec(SpecModel):
    """Fleet-wide guard rails around agent breakers.

    At most ``max_ejected_share`` of a pool's agents may be ejected (breaker not closed)
    at once, but always at least one (so a small pool can still eject its bad agent); a
    breaker that would open beyond the cap stays closed and the refusal is recorded. When
    the share of healthy agents falls below ``panic_threshold`` the breakers are ignored
    for routing and every agent gets traffic (0 turns panic off).
    """

    max_ejected_share: Share = DEFAULT_MAX_EJECTED_SHARE
    panic_threshold: UnitFraction = DEFAULT_PANIC_THRESHOLD


class RetrySpec(BackoffSpec):
    """Retries of failed tasks: how often, how far apart, which failures, how many.

    A failed attempt ``n`` (1-based) is retried after the ``BackoffSpec`` delay of try
    ``n``: about ``min(initial_backoff_s * backoff_multiplier ** (n - 1),
    max_backoff_s)`` seconds, of which a random share up to ``jitter_ratio`` is taken off
    (default 1, "full jitter", so retries of many tasks spread out instead of arriving
    together). A task gets at most
    ``max_attempts`` attempts in all (a task may ask for fewer). Only failures whose
    reason is in ``retryable_reasons`` or whose exception class is in
    ``retryable_errors`` are retried; ``non_retryable_errors`` never are; any other
    failure (e.g. an agent's unexpected exception, which another agent may not repeat)
    is retried if ``retry_unknown_errors``. Retries are budgeted: over the last
    ``budget_window_s`` seconds they may be at most ``budget_ratio`` of the first
    attempts, plus ``min_retries_per_s`` so a quiet pool can still retry.
    """

    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    retryable_reasons: tuple[str, ...] = DEFAULT_RETRYABLE_REASONS
    retryable_errors: tuple[str, ...] = DEFAULT_RETRYABLE_ERRORS
    non_retryable_errors: tuple[str, ...] = DEFAULT_NON_RETRYABLE_ERRORS
    retry_unknown_errors: bool = True
    budget_ratio: UnitFraction = DEFAULT_RETRY_BUDGET_RATIO
    budget_window_s: float = Field(
        default=DEFAULT_RETRY_BUDGET_WINDOW_S, gt=0, allow_inf_nan=False
    )
    min_retries_per_s: float = Field(
        default=DEFAULT_MIN_RETRIES_PER_S, ge=0, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _check(self) -> RetrySpec:
        both = set(self.retryable_errors) & set(self.non_retryable_errors)
        if both:
            raise ValueError(
                f"{sorted(both)} listed in both retryable_errors and non_retryable_errors"
            )
        return self

    @property
    def budget_floor(self) -> float:
        """Retries allowed per window however little traffic there is."""
        return self.min_retries_per_s * self.budget_window_s


class ResilienceSpec(SpecModel):
    """``task_timeout_s`` bounds one execution of a task on an agent; a task that
    exceeds it fails with reason ``timeout``. ``max_deliveries`` bounds how often a task
    whose holder died is handed out again before it fails with ``max_deliveries``.

    ``agent_breaker`` is the breaker kept per agent (or per host, if the runtime routes
    to hosts); ``dependency_breaker`` the one per downstream dependency (an LLM API, a
    database), overridden per dependency name in ``dependency_breakers``.
    """

    task_timeout_s: float = Field(default=DEFAULT_TASK_TIMEOUT_S, gt=0)
    max_deliveries: int = Field(default=DEFAULT_MAX_DELIVERIES, ge=1)
    agent_breaker: BreakerSpec = BreakerSpec()
    dependency_breaker: BreakerSpec = BreakerSpec()
    dependency_breakers: dict[str, BreakerSpec] = Field(default_factory=dict)
    ejection: EjectionSpec = EjectionSpec()
    retry: RetrySpec = RetrySpec()

    def breaker_for_dependency(self, name: str) -> BreakerSpec:
        return self.dependency_breakers.get(name, self.dependency_breaker)
