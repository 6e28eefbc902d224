"""The fleet spec: pydantic models, one per concern, loaded from YAML."""

from fleet.spec.autoscaling import AutoscalingSpec
from fleet.spec.backoff import BackoffSpec
from fleet.spec.budgets import (
    BudgetsSpec,
    ModelPrice,
    PriorityClass,
    ScopeLimits,
    check_budget_covers,
)
from fleet.spec.consensus import ConsensusMode, ConsensusSpec, TieBreaker, WeighBy
from fleet.spec.fleet import FleetSpec, SpecError, load_spec, parse_spec
from fleet.spec.health import CascadeSpec, HealthSpec, RestartSpec
from fleet.spec.pools import PoolSpec
from fleet.spec.queues import BatchSpec, Discipline, QueueSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.spec.results import ResultsSpec
from fleet.spec.routing import RouterName, RoutingSpec

__all__ = [
    "AutoscalingSpec",
    "BackoffSpec",
    "BatchSpec",
    "BudgetsSpec",
    "CascadeSpec",
    "ConsensusMode",
    "ConsensusSpec",
    "Discipline",
    "FleetSpec",
    "HealthSpec",
    "ModelPrice",
    "PoolSpec",
    "PriorityClass",
    "QueueSpec",
    "ResilienceSpec",
    "RestartSpec",
    "ResultsSpec",
    "RouterName",
    "RoutingSpec",
    "ScopeLimits",
    "SpecError",
    "TieBreaker",
    "WeighBy",
    "check_budget_covers",
    "load_spec",
    "parse_spec",
]
