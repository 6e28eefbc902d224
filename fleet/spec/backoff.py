"""Backoff: how long to wait before the next try of something that failed.

One model for every exponential backoff a spec configures: task retries
(``resilience.retry``) and agent restarts (``health.restart``) extend ``BackoffSpec``,
so their YAML keeps the same four flat fields; breakers' open durations grow by the
same rule (``BreakerSpec.open_backoff``). ``fleet.policy.backoff`` computes the delays.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel
from fleet.spec._types import UnitFraction

DEFAULT_INITIAL_BACKOFF_S = 0.1
DEFAULT_MAX_BACKOFF_S = 10.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0
DEFAULT_JITTER_RATIO = 1.0  # "full jitter": uniform in [0, exponential delay]

BackoffSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A delay in seconds: finite, >= 0."""
BackoffMultiplier = Annotated[float, Field(ge=1, allow_inf_nan=False)]
"""Growth per try: finite, >= 1 (1 keeps the delay constant)."""


class BackoffSpec(SpecModel):
    """Exponential backoff with a cap and jitter.

    Try ``n`` (1-based) waits ``min(initial_backoff_s * backoff_multiplier ** (n - 1),
    max_backoff_s)`` seconds, less a random share up to ``jitter_ratio`` of it (1 = "full
    jitter", uniform in [0, delay]; 0.5 "equal jitter"; 0 none), so that many things
    that failed together do not try again together. A section that extends it sets its
    own defaults by redeclaring a field with the same type.
    """

    initial_backoff_s: BackoffSeconds = DEFAULT_INITIAL_BACKOFF_S
    max_backoff_s: BackoffSeconds = DEFAULT_MAX_BACKOFF_S
    backoff_multiplier: BackoffMultiplier = DEFAULT_BACKOFF_MULTIPLIER
    jitter_ratio: UnitFraction = DEFAULT_JITTER_RATIO

    # Named apart from the subclasses' own ``_check``: a validator of the same name in a
    # subclass would replace this one instead of running beside it.
    @model_validator(mode="after")
    def _check_backoff_cap(self) -> BackoffSpec:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) must be >= "
                f"initial_backoff_s ({self.initial_backoff_s})"
            )
        return self


__all__ = [
    "DEFAULT_BACKOFF_MULTIPLIER",
    "DEFAULT_INITIAL_BACKOFF_S",
    "DEFAULT_JITTER_RATIO",
    "DEFAULT_MAX_BACKOFF_S",
    "BackoffMultiplier",
    "BackoffSeconds",
    "BackoffSpec",
]
