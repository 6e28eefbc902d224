"""The fleet spec: pydantic models, one per concern, loaded from YAML."""

from fleet.spec.autoscaling import AutoscalingSpec
from fleet.spec.budgets import BudgetsSpec, ModelPrice
from fleet.spec.consensus import ConsensusMode, ConsensusSpec, TieBreaker, WeighBy
from fleet.spec.fleet import FleetSpec, SpecError, load_spec, parse_spec
from fleet.spec.pools import PoolSpec
from fleet.spec.queues import BatchSpec, Discipline, QueueSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.spec.routing import RouterName, RoutingSpec

__all__ = [
    "AutoscalingSpec",
    "BatchSpec",
    "BudgetsSpec",
    "ConsensusMode",
    "ConsensusSpec",
    "Discipline",
    "FleetSpec",
    "ModelPrice",
    "PoolSpec",
    "QueueSpec",
    "ResilienceSpec",
    "RouterName",
    "RoutingSpec",
    "SpecError",
    "TieBreaker",
    "WeighBy",
    "load_spec",
    "parse_spec",
]
