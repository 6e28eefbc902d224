"""A pool's graceful degradation: while the pool is in trouble, new tasks go to a
fallback pool (a smaller model, a cheaper path) instead of waiting or failing, or are
answered from a cache of its recent results for the same key, and each result says so
(``degraded: true`` and the rule that fired).

``to_pool``: the fallback pool. ``from_cache``: a new task with a ``cache_key`` (and
an id fleet makes up: not the client's own, which may be queued already) is answered
at once with the newest result the pool completed for that key (same tenant) in the
last ``cache_max_age_s``, recorded as the new task's own outcome and marked degraded,
by the Python client and the HTTP ingress (not the Kafka intake); a task without a key,
or with no recent result, goes to ``to_pool`` when it is set, else to the pool as
usual. At least one of the two is set.

The signals, each optional (at least one is set), read by the controller every tick:
``predicted_wait_s``, the wait admission control predicts for a new task of the lowest
priority (its queue and drain rate: ``fleet.policy.admission``); ``error_rate``, the
share of the pool's finished tasks that failed over the last tick; ``ejected_share``,
the share of its agents its breakers have ejected. Degradation starts when any signal
reaches its threshold and ends, by itself, once every signal has stayed below
``recover_share`` of its threshold for ``recover_after_s`` (hysteresis: no flapping on
the edge). The rule is ``fleet.policy.degrade``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel
from fleet.spec._types import Share

SIGNALS = ("predicted_wait_s", "error_rate", "ejected_share")


class DegradeSpec(SpecModel):
    to_pool: str | None = None
    from_cache: bool = False
    cache_max_age_s: float = Field(default=300.0, gt=0, le=86_400, allow_inf_nan=False)
    predicted_wait_s: float | None = Field(default=None, gt=0, le=86_400, allow_inf_nan=False)
    error_rate: Share | None = None
    ejected_share: Share | None = None
    recover_share: float = Field(default=0.5, gt=0, lt=1)
    recover_after_s: float = Field(default=10.0, ge=0, le=3_600, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_signal(self) -> DegradeSpec:
        if self.to_pool is None and not self.from_cache:
            raise ValueError(
                "set to_pool, from_cache: true, or both: a degrade rule needs somewhere "
                "to send new tasks"
            )
        if not self.thresholds():
            raise ValueError(
                f"set at least one of {', '.join(SIGNALS)}: a degrade rule needs a "
                "signal to start on"
            )
        return self

    def thresholds(self) -> dict[str, float]:
        """The signals this rule watches, with their thresholds."""
        return {s: v for s in SIGNALS if (v := getattr(self, s)) is not None}
