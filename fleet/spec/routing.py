"""Routing section: how a pool picks the agent (and host) for each task."""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from fleet.spec._base import SpecModel
from fleet.spec._types import Share

DEFAULT_CHOICES_D = 2
DEFAULT_AFFINITY_LOAD_FACTOR = 1.25
DEFAULT_MIN_SUCCESS_RATE = 0.8
DEFAULT_SUCCESS_WINDOW_S = 60.0
DEFAULT_SUCCESS_MIN_CALLS = 10


class RouterName(str, Enum):
    LEAST_LOADED = "least_loaded"  # power of d choices
    FULL_SCAN = "full_scan"  # least loaded over every candidate
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    CAPACITY = "capacity"  # random, weighted by size x free slots
    SPECIALIZATION = "specialization"  # experts for the task type first
    AFFINITY = "affinity"  # same key -> same agent, with bounded load
    SUCCESS_RATE = "success_rate"  # skip agents failing this task type


class BalancerName(str, Enum):
    """The routers that pick among already-eligible candidates (no filtering of their own).

    Specialization and success-rate routing narrow the candidates, then hand the rest
    to the balancer; affinity routing uses it for tasks without an affinity key.
    """

    LEAST_LOADED = "least_loaded"
    FULL_SCAN = "full_scan"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    CAPACITY = "capacity"


class SpecializationFallback(str, Enum):
    GENERALISTS_FIRST = "generalists_first"  # agents without expertise, then anyone
    ANY = "any"  # any free agent
    WAIT = "wait"  # no choice: the task stays queued until an expert is free


class SuccessRateFallback(str, Enum):
    ALL = "all"  # every free agent (like a breaker's panic mode)
    BEST = "best"  # the free agents with the highest success rate


class SpecializationSpec(SpecModel):
    """Tasks of a type go to agents whose ``expertise`` includes it; when none of them
    is free, ``fallback`` decides."""

    fallback: SpecializationFallback = SpecializationFallback.GENERALISTS_FIRST


class AffinitySpec(SpecModel):
    """Tasks sharing an affinity key go to the same agent (weighted rendezvous hashing),
    unless it already holds more than ``load_factor`` x its fair share of the in-flight
    work: then the key's next agent in its hash order takes it. 1 keeps loads perfectly
    even (keys move more); larger values keep keys more sticky."""

    load_factor: float = Field(default=DEFAULT_AFFINITY_LOAD_FACTOR, ge=1, allow_inf_nan=False)


class SuccessRateSpec(SpecModel):
    """Agents whose success rate for the task's type, over the last ``window_s``
    seconds, is below ``min_success_rate`` get no more of that type. An agent with fewer
    than ``min_calls`` calls in the window counts as good, so an excluded agent is tried
    again once its failures age out. When no free agent qualifies, ``fallback`` decides."""

    min_success_rate: Share = DEFAULT_MIN_SUCCESS_RATE
    window_s: float = Field(default=DEFAULT_SUCCESS_WINDOW_S, gt=0, allow_inf_nan=False)
    min_calls: int = Field(default=DEFAULT_SUCCESS_MIN_CALLS, ge=1)
    fallback: SuccessRateFallback = SuccessRateFallback.ALL


class RoutingSpec(SpecModel):
    """Router choice per pool and each router's parameters.

    ``choices_d`` is the sample size of power-of-d routing (``least_loaded``);
    ``balancer`` is how the filtering routers (``specialization``, ``success_rate``) and
    ``affinity`` (for tasks without a key) pick among the candidates they keep.
    """

    router: RouterName = RouterName.LEAST_LOADED
    choices_d: int = Field(default=DEFAULT_CHOICES_D, ge=1)
    balancer: BalancerName = BalancerName.LEAST_LOADED
    specialization: SpecializationSpec = SpecializationSpec()
    affinity: AffinitySpec = AffinitySpec()
    success_rate: SuccessRateSpec = SuccessRateSpec()
