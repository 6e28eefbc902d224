"""Routing section: how a pool picks the agent (and host) for each task."""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from fleet.spec._base import SpecModel


class RouterName(str, Enum):
    LEAST_LOADED = "least_loaded"  # power of d choices
    FULL_SCAN = "full_scan"  # least loaded over every candidate
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


class RoutingSpec(SpecModel):
    """Router choice per pool. ``choices_d`` is the sample size of power-of-d routing."""

    router: RouterName = RouterName.LEAST_LOADED
    choices_d: int = Field(default=2, ge=1)
