"""Health section: failure detection, restart backoff and the fleet-wide cascade guard.

``fleet.policy.health`` reads it. An agent is declared unhealthy when its heartbeat is
older than ``heartbeat_timeout_s``, when one task has run longer than its limit plus
``hung_task_grace_s``, or when its error rate over ``error_window_s`` reaches
``error_rate_threshold`` (once the window holds ``error_min_calls`` outcomes). ``restart``
says how fast a failed agent is restarted; ``cascade`` how restarts are throttled when a
large share of the fleet fails at once.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel
from fleet.spec._types import Share, UnitFraction
from fleet.spec.backoff import BackoffSeconds, BackoffSpec

DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0  # three missed heartbeats
DEFAULT_STARTUP_TIMEOUT_S = 60.0
DEFAULT_TASK_LIMIT_S = 300.0
DEFAULT_HUNG_TASK_GRACE_S = 5.0
DEFAULT_ERROR_WINDOW_S = 60.0
DEFAULT_ERROR_MIN_CALLS = 10
DEFAULT_ERROR_RATE_THRESHOLD = 0.5
DEFAULT_FAILURE_LOG_SIZE = 100

DEFAULT_RESTART_INITIAL_BACKOFF_S = 1.0
DEFAULT_RESTART_MAX_BACKOFF_S = 300.0
DEFAULT_RESTART_JITTER_RATIO = 0.2
DEFAULT_RESTART_RESET_AFTER_S = 600.0
DEFAULT_EJECT_AFTER_FAILURES = 10

DEFAULT_CASCADE_SHARE = 0.1
DEFAULT_CASCADE_MIN_FAILING_AGENTS = 2
DEFAULT_CASCADE_MAX_RESTARTS_PER_INTERVAL = 5
DEFAULT_CASCADE_INTERVAL_S = 10.0
DEFAULT_CASCADE_HALF_OPEN_GROWTH = 2.0
DEFAULT_CASCADE_PROBE_SUCCESSES = 3
DEFAULT_CASCADE_PROBE_HEALTHY_S = 30.0


class RestartSpec(BackoffSpec):
    """Per-agent restart backoff.

    The ``n``-th consecutive failure of an agent waits the ``BackoffSpec`` delay of try
    ``n``, ``min(initial_backoff_s * backoff_multiplier ** (n - 1), max_backoff_s)``
    seconds less a random share up to ``jitter_ratio`` (so agents that failed together
    do not restart together), before its restart. An agent that stays healthy for
    ``reset_after_s`` seconds starts again from ``initial_backoff_s``. After
    ``eject_after_failures`` consecutive failures the agent is ejected for good (until an
    operator reinstates it); ``None`` never ejects.
    """

    initial_backoff_s: BackoffSeconds = DEFAULT_RESTART_INITIAL_BACKOFF_S
    max_backoff_s: BackoffSeconds = DEFAULT_RESTART_MAX_BACKOFF_S
    jitter_ratio: UnitFraction = DEFAULT_RESTART_JITTER_RATIO
    reset_after_s: float = Field(
        default=DEFAULT_RESTART_RESET_AFTER_S, ge=0, allow_inf_nan=False
    )
    eject_after_failures: int | None = Field(default=DEFAULT_EJECT_AFTER_FAILURES, ge=1)


class CascadeSpec(SpecModel):
    """The fleet-level breaker that stops restarts from becoming a cascade.

    CLOSED: restarts follow each agent's backoff. When more than ``cascade_share`` of
    the agents (and at least ``min_failing_agents``) are failing at once, the guard
    OPENs: it raises an alert and allows at most ``max_restarts_per_interval`` restarts
    per ``interval_s``. Those restarts are probes: after ``probe_successes`` restarted
    agents stayed healthy for ``probe_healthy_s`` (or once the failing share is at most
    ``resume_share``) it goes HALF_OPEN, where the allowance grows by
    ``half_open_growth`` each interval; a probe that fails again reopens it. It CLOSEs
    when the failing share is at most ``resume_share`` and the allowance covers every
    agent still failing. ``resume_share`` defaults to half of ``cascade_share``.
    """

    enabled: bool = True
    cascade_share: Share = DEFAULT_CASCADE_SHARE
    min_failing_agents: int = Field(default=DEFAULT_CASCADE_MIN_FAILING_AGENTS, ge=1)
    max_restarts_per_interval: int = Field(
        default=DEFAULT_CASCADE_MAX_RESTARTS_PER_INTERVAL, ge=1
    )
    interval_s: float = Field(default=DEFAULT_CASCADE_INTERVAL_S, gt=0, allow_inf_nan=False)
    resume_share: UnitFraction | None = None
    half_open_growth: float = Field(
        default=DEFAULT_CASCADE_HALF_OPEN_GROWTH, gt=1, allow_inf_nan=False
    )
    probe_successes: int = Field(default=DEFAULT_CASCADE_PROBE_SUCCESSES, ge=1)
    probe_healthy_s: float = Field(
        default=DEFAULT_CASCADE_PROBE_HEALTHY_S, ge=0, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _check(self) -> CascadeSpec:
        if self.resume_share is not None and self.resume_share > self.cascade_share:
            raise ValueError(
                f"resume_share ({self.resume_share}) must be <= cascade_share "
                f"({self.cascade_share}), or the guard could never close"
            )
        return self

    @property
    def effective_resume_share(self) -> float:
        return self.cascade_share / 2 if self.resume_share is None else self.resume_share


class HealthSpec(SpecModel):
    """Failure detection for logical agents, and how they are recovered.

    Agents report a heartbeat every ``heartbeat_interval_s``; one silent for longer than
    ``heartbeat_timeout_s`` is unhealthy, and so is a (re)started agent that has not
    reported within ``startup_timeout_s``. A task with no limit of its own is allowed
    ``default_task_limit_s``. When ``recover_on_heartbeat`` is on, an agent declared
    unhealthy only for missed heartbeats (a partition, a stalled event loop) that reports
    again before its restart is returned to service without one.
    """

    heartbeat_interval_s: float = Field(
        default=DEFAULT_HEARTBEAT_INTERVAL_S, gt=0, allow_inf_nan=False
    )
    heartbeat_timeout_s: float = Field(
        default=DEFAULT_HEARTBEAT_TIMEOUT_S, gt=0, allow_inf_nan=False
    )
    startup_timeout_s: float = Field(
        default=DEFAULT_STARTUP_TIMEOUT_S, gt=0, allow_inf_nan=False
    )
    default_task_limit_s: float = Field(
        default=DEFAULT_TASK_LIMIT_S, gt=0, allow_inf_nan=False
    )
    hung_task_grace_s: float = Field(
        default=DEFAULT_HUNG_TASK_GRACE_S, ge=0, allow_inf_nan=False
    )
    error_window_s: float = Field(default=DEFAULT_ERROR_WINDOW_S, gt=0, allow_inf_nan=False)
    error_min_calls: int = Field(default=DEFAULT_ERROR_MIN_CALLS, ge=1)
    error_rate_threshold: Share = DEFAULT_ERROR_RATE_THRESHOLD
    recover_on_heartbeat: bool = True
    failure_log_size: int = Field(default=DEFAULT_FAILURE_LOG_SIZE, ge=1)
    restart: RestartSpec = RestartSpec()
    cascade: CascadeSpec = CascadeSpec()

    @model_validator(mode="after")
    def _check(self) -> HealthSpec:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be greater than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}): a healthy agent "
                "whose heartbeat arrives a little late would be declared dead"
            )
        return self
