"""Outcome codes of simulated tasks (``Simulation.outcome``; 0: none recorded yet) and
the reasons they stand for in reports."""

from __future__ import annotations

OK, ERROR, TIMEOUT, MAX_DELIVERIES, MAX_ATTEMPTS, RETRY_BUDGET = 1, 2, 3, 4, 5, 6
# Dropped by the queue when the dispatcher met it past its deadline (no agent time).
DEADLINE_EXCEEDED = 7
# Failed, and its retry could not start before its deadline (the host core's verdict).
RETRY_DEADLINE = 8
# The host core's final retry verdicts that replace a failure's own reason.
VERDICT_CODES = {
    "max_attempts": MAX_ATTEMPTS,
    "retry_budget_exhausted": RETRY_BUDGET,
    "deadline": RETRY_DEADLINE,
}
REASONS = {
    ERROR: "error",
    TIMEOUT: "timeout",
    MAX_DELIVERIES: "max_deliveries",
    MAX_ATTEMPTS: "max_attempts",
    RETRY_BUDGET: "retry_budget_exhausted",
    DEADLINE_EXCEEDED: "deadline_exceeded",
    RETRY_DEADLINE: "deadline",
}
