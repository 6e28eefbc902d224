"""The whole fleet spec and its loader."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from fleet.spec._base import SpecModel
from fleet.spec.budgets import BudgetsSpec, check_budget_covers
from fleet.spec.bulkheads import BulkheadsSpec
from fleet.spec.consensus import ConsensusSpec
from fleet.spec.health import HealthSpec
from fleet.spec.ingress import IngressSpec
from fleet.spec.observability import ObservabilitySpec
from fleet.spec.pools import Name, PoolSpec
from fleet.spec.queues import Discipline, QueueSpec
from fleet.spec.resilience import ResilienceSpec
from fleet.spec.results import ResultsSpec


class SpecError(ValueError):
    """A spec that failed validation; ``errors`` holds one ``(field_path, reason)`` each."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {reason}" for path, reason in errors)
        super().__init__(f"invalid fleet spec {source}:\n{lines}")


class FleetSpec(SpecModel):
    """Everything a platform team declares about one fleet."""

    name: Name = "fleet"
    namespace: Name = "fleet"
    pools: list[PoolSpec] = Field(min_length=1)
    queues: QueueSpec = QueueSpec()
    budgets: BudgetsSpec = BudgetsSpec()
    resilience: ResilienceSpec = ResilienceSpec()
    consensus: ConsensusSpec = ConsensusSpec()
    health: HealthSpec = HealthSpec()
    results: ResultsSpec = ResultsSpec()
    ingress: IngressSpec = IngressSpec()
    observability: ObservabilitySpec = ObservabilitySpec()
    bulkheads: BulkheadsSpec = BulkheadsSpec()

    @model_validator(mode="after")
    def _check_unique(self) -> FleetSpec:
        for attr in ("name", "capability"):
            seen: dict[str, int] = {}
            for i, pool in enumerate(self.pools):
                value = getattr(pool, attr)
                if value in seen:
                    raise ValueError(
                        f"pools.{i}.{attr}: {value!r} is already used by pools.{seen[value]}"
                    )
                seen[value] = i
        # Budgets are checked against the pools: a per-agent minimum the daily total
        # cannot cover at the pools' max_agents is rejected with the arithmetic.
        check_budget_covers(self.budgets, self.pools)
        self._check_bulkheads()
        self._check_fallbacks()
        self._check_preemption()
        return self

    def _check_preemption(self) -> None:
        """Preemption needs the priority discipline and two classes or more."""
        for i, p in enumerate(self.pools):
            if not p.preemption.enabled:
                continue
            if self.queues.discipline is not Discipline.PRIORITY:
                raise ValueError(
                    f"pools.{i}.preemption.enabled: needs queues.discipline: priority (is "
                    f"{self.queues.discipline.value}): the slot a preemption frees must go "
                    "to the urgent task"
                )
            if len(self.budgets.priority_classes) < 2:
                raise ValueError(
                    f"pools.{i}.preemption.enabled: needs at least two "
                    "budgets.priority_classes: a task of a higher class preempts one of a "
                    "lower class"
                )

    def _check_fallbacks(self) -> None:
        """Every ``degrade.to_pool`` names another pool, and following them never
        comes back to where it started."""
        index = {p.name: i for i, p in enumerate(self.pools)}
        for i, p in enumerate(self.pools):
            if p.degrade is None:
                continue
            to: str | None = p.degrade.to_pool
            if to is not None and to not in index:
                raise ValueError(
                    f"pools.{i}.degrade.to_pool: no pool is named {to!r} "
                    f"(pools: {', '.join(sorted(index))})"
                )
            path = [p.name]
            while to is not None:
                if to in path:
                    raise ValueError(
                        f"pools.{i}.degrade.to_pool: the fallbacks go round in a cycle "
                        f"({' -> '.join([*path, to])})"
                    )
                path.append(to)
                nxt = self.pools[index[to]].degrade
                to = None if nxt is None else nxt.to_pool

    def _check_bulkheads(self) -> None:
        """Bulkheads name pools that exist, and each limit leaves every queue shard a
        share of at least one task (``fleet.spec.bulkheads``)."""
        b, shards = self.bulkheads, self.queues.shards
        names = {p.name for p in self.pools}
        for pool in b.pools:
            if pool not in names:
                raise ValueError(
                    f"bulkheads.pools.{pool}: no pool is named {pool!r} "
                    f"(pools: {', '.join(sorted(names))})"
                )
        scopes = [
            *(f"pools.{k}" for k in b.pools),
            "tenant",
            *(f"tenants.{k}" for k in b.tenants),
        ]
        limits = [*b.pools.values(), b.tenant, *b.tenants.values()]
        for scope, lim in zip(scopes, limits):
            for name, value in lim.below(shards):
                raise ValueError(
                    f"bulkheads.{scope}.{name}: {value} is below queues.shards ({shards}): "
                    "each queue shard enforces its share of the limit, so it must be at "
                    "least one per shard"
                )

    def pool_for(self, capability: str) -> PoolSpec:
        for pool in self.pools:
            if pool.capability == capability:
                return pool
        raise KeyError(capability)

    @property
    def control_interval_s(self) -> float:
        """How often the controller ticks: its shortest pool's control interval (and
        how often entry points refresh their admission view)."""
        return min(p.autoscaling.control_interval_s for p in self.pools)

    @property
    def capabilities(self) -> list[str]:
        return [p.capability for p in self.pools]


def _format_errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the spec)"
        out.append((path, msg.removeprefix("Value error, ")))
    return out


def parse_spec(data: Any, source: str = "<dict>") -> FleetSpec:
    """Validate a mapping as a FleetSpec, raising SpecError with field paths."""
    if not isinstance(data, dict):
        raise SpecError(source, [("<root>", f"expected a mapping, got {type(data).__name__}")])
    try:
        return FleetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, _format_errors(exc)) from None


def load_spec(path: str | Path, environ: Mapping[str, str] = os.environ) -> FleetSpec:
    """Load and validate a YAML fleet spec; every problem is reported with its field path.

    ``${NAME}`` and ``${NAME:-default}`` in its strings (keys too) are replaced by the
    environment variable ``NAME`` of the machine that loads it (``environ``), so one
    file serves several endpoints or models; an unset one without a default is an error
    naming the field and the variable. Secrets do not belong there (the value ends up
    in the spec): name them instead (``pools[].llm.api_key_env``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [("<file>", exc.strerror or str(exc))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [("<yaml>", str(exc))]) from None
    errors: list[tuple[str, str]] = []
    data = _expand(data, environ, (), errors)
    if errors:
        raise SpecError(str(path), errors)
    return parse_spec(data, str(path))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(
    value: Any, environ: Mapping[str, str], at: tuple[str, ...], errors: list[tuple[str, str]]
) -> Any:
    """``value`` with its ``${NAME}`` references replaced (see ``load_spec``)."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = environ.get(name, default)
            if got is None:
                errors.append(
                    (
                        ".".join(at) or "<root>",
                        f"environment variable {name} is not set (and ${{{name}}} has no "
                        f"default: write ${{{name}:-default}})",
                    )
                )
                return ""
            return got

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {
            _expand(k, environ, at, errors): _expand(v, environ, (*at, str(k)), errors)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, environ, (*at, str(i)), errors) for i, v in enumerate(value)]
    return value
