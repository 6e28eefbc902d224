"""Autoscaling section: how many logical agents a pool should run, and how fast that moves."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel

DEFAULT_TARGET_QUEUED_PER_AGENT = 100.0
DEFAULT_CONTROL_INTERVAL_S = 1.0
DEFAULT_DOWNSCALE_STABILIZATION_S = 300.0


class AutoscalingSpec(SpecModel):
    """Queue-depth autoscaling of a pool's logical agents.

    desired = ceil((queued + in_flight) / target_queued_per_agent), clamped to
    [min_agents, max_agents], then rate-limited: scale-up reaches the desired count
    within ``upscale_within_s`` (and never faster than the per-period caps), scale-down
    only follows the highest desired value seen over ``downscale_stabilization_s`` and
    spreads the reduction over ``downscale_within_s``.
    """

    min_agents: int = Field(default=1, ge=0)
    max_agents: int = Field(default=100, ge=1)
    initial_agents: int | None = Field(default=None, ge=0)
    target_queued_per_agent: float = Field(default=DEFAULT_TARGET_QUEUED_PER_AGENT, gt=0)
    control_interval_s: float = Field(default=DEFAULT_CONTROL_INTERVAL_S, gt=0)

    upscale_within_s: float = Field(default=60.0, ge=0)
    upscale_max_agents_per_interval: int | None = Field(default=None, ge=1)
    upscale_max_fraction_per_interval: float | None = Field(default=None, gt=0)
    upscale_cooldown_s: float = Field(default=0.0, ge=0)

    downscale_within_s: float = Field(default=300.0, ge=0)
    downscale_max_agents_per_interval: int | None = Field(default=None, ge=1)
    downscale_max_fraction_per_interval: float | None = Field(default=None, gt=0, le=1)
    downscale_stabilization_s: float = Field(default=DEFAULT_DOWNSCALE_STABILIZATION_S, ge=0)
    downscale_cooldown_s: float = Field(default=0.0, ge=0)

    missing_metrics: Literal["hold", "min", "max"] = "hold"
    """What to do when the queue depth is unknown: keep the current count (the safe
    default), fall to ``min_agents`` or rise to ``max_agents``."""

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.min_agents > self.max_agents:
            raise ValueError(
                f"min_agents ({self.min_agents}) must be <= max_agents ({self.max_agents})"
            )
        if self.initial_agents is not None and not (
            self.min_agents <= self.initial_agents <= self.max_agents
        ):
            raise ValueError(
                f"initial_agents ({self.initial_agents}) must lie within "
                f"[min_agents, max_agents] = [{self.min_agents}, {self.max_agents}]"
            )
        return self

    @property
    def start_agents(self) -> int:
        return self.min_agents if self.initial_agents is None else self.initial_agents
