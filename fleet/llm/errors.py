"""The failures of a model call (``fleet.llm``): each one's ``fleet_reason`` is the
failure reason the host records for its task (``fleet.policy.retry`` decides which are
retried), and ``retry_after_s`` the provider's ``Retry-After`` when it sent one."""

from __future__ import annotations


class ProviderError(Exception):
    """A provider call failed; ``fleet_reason`` is the task's failure reason."""

    fleet_reason = "provider_error"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderRateLimited(ProviderError):
    fleet_reason = "rate_limited"


class ProviderUnreachable(ProviderError):
    fleet_reason = "provider_unreachable"


class ProviderAuth(ProviderError):
    fleet_reason = "provider_auth"


class ProviderRejected(ProviderError):
    fleet_reason = "provider_rejected"


class ProviderBadResponse(ProviderError):
    fleet_reason = "provider_bad_response"


class CapExceeded(ProviderError):
    """A call could spend more than its task reserved (``fleet.llm.caps``): not made."""

    fleet_reason = "budget_exhausted"
