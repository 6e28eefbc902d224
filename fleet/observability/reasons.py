"""The vocabulary of failure reasons a metric label may carry.

A recorded outcome's ``reason`` is one of these (the runtime makes no other); anything
else (a reason a future agent class invents) is counted as ``other``, so the label's
values stay a fixed, small set.
"""

from __future__ import annotations

OK = "ok"
OTHER = "other"
REASONS = (
    "error",  # the agent raised
    "timeout",  # past task_timeout_s (running, or waiting for an agent)
    "bad_output",  # the output is not JSON
    "output_too_large",  # over results.max_output_bytes
    "budget_exhausted",  # refused by a budget
    "budget_requeue",  # every agent of a host out of its own budget (retried)
    "retry_budget_exhausted",  # a retryable failure the retry budget could not pay for
    "max_attempts",  # retried resilience.retry.max_attempts times, failed each time
    "deadline",  # the next attempt could not start before the task's deadline
    "rejected",  # the agent refused the task (never retried)
    "validation",  # the agent found the task invalid (never retried)
    "deadline_exceeded",  # its deadline passed before it could start
    "max_deliveries",  # delivered max_deliveries times without an outcome
    "host_crash",  # exhausted by deliveries whose hosts died
    "cancelled",  # DELETE /tasks/{id} before it started
    OTHER,
)
_KNOWN = frozenset(REASONS)


def reason_label(reason: str | None) -> str:
    """The label value for a failure reason."""
    return reason if reason in _KNOWN else OTHER  # type: ignore[return-value]


def outcome_labels(ok: bool, reason: str | None) -> tuple[str, str]:
    """(outcome, reason) label values of a recorded outcome."""
    return ("completed", OK) if ok else ("failed", reason_label(reason))
