"""Budgets section: token prices, the fleet's cost budget and how it is shared, quotas.

``prices`` put a cost on every result (USD per million tokens, per model). ``daily_usd``
is the fleet's money per day; ``fleet.policy.budget`` shares it among the agents present
(``allocation``), each getting between ``per_agent_min_usd`` and ``per_agent_max_usd``,
with ``priority_classes`` (highest first) deciding who loses share first under overload
(``preemption``). ``per_agent``, ``pools`` and ``tenants`` add fixed quotas of USD,
tokens and CPU seconds per hour or day. Windows are aligned to the clock's epoch (UTC
midnight and the top of the hour for a Unix clock).

``check_budget_covers`` cross-checks this section against the pools (their
``autoscaling.max_agents``); ``FleetSpec`` calls it at load.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from fleet.spec._base import SpecModel
from fleet.spec._types import Share

HOUR_S = 3_600.0
DAY_S = 86_400.0
WINDOW_S = {"hourly": HOUR_S, "daily": DAY_S}

DEFAULT_ALERT_THRESHOLDS = (0.5, 0.8, 0.95)
DEFAULT_REBALANCE_INTERVAL_S = 60.0
DEFAULT_BURN_RATE_WINDOW_S = 3_600.0
DEFAULT_DEMAND_HEADROOM = 1.25
DEFAULT_PRIORITY_CLASS = "default"
DEFAULT_RESERVATION_GRACE_S = 30.0


def _non_negative(value: float) -> float:
    if not value >= 0 or math.isinf(value):  # `not >=` also catches NaN
        raise ValueError(f"{value} is negative or not finite: it must be a finite number >= 0")
    return value


def _price(value: float) -> float:
    if not value >= 0 or math.isinf(value):
        raise ValueError(
            f"price {value} is negative or not finite: prices are USD per "
            "million tokens and must be >= 0"
        )
    return value


NonNegative = Annotated[float, AfterValidator(_non_negative)]
Price = Annotated[float, AfterValidator(_price)]


def _num(x: float) -> str:
    """50.0 -> '50', 0.5 -> '0.5': numbers in error messages as a user wrote them."""
    return f"{x:.6f}".rstrip("0").rstrip(".")


class ModelPrice(SpecModel):
    """Price of one LLM model in USD per million tokens."""

    input_usd_per_mtok: Price
    output_usd_per_mtok: Price

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok
        ) / 1e6


class ScopeLimits(SpecModel):
    """Fixed quotas of one scope (an agent, a pool, a tenant) per hour and per day.

    None means no limit. Tokens count input plus output tokens.
    """

    hourly_usd: NonNegative | None = None
    daily_usd: NonNegative | None = None
    hourly_tokens: int | None = Field(default=None, ge=0)
    daily_tokens: int | None = Field(default=None, ge=0)
    hourly_cpu_s: NonNegative | None = None
    daily_cpu_s: NonNegative | None = None

    def limits(self) -> dict[tuple[str, str], float]:
        """``{(resource, window): limit}`` for the quotas that are set, e.g.
        ``{("usd", "daily"): 100.0}``."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                window, resource = name.split("_", 1)
                out[(resource, window)] = float(value)
        return out


class TaskEstimate(SpecModel):
    """The most one task of a pool may cost: what the runtime reserves before it runs.

    Either ``usd`` directly, or ``model`` with the maximum ``input_tokens`` and
    ``output_tokens`` (priced from ``prices``); ``tokens`` counts input plus output for
    token budgets. Settlement replaces the estimate by the task's actual cost, so a
    generous estimate only holds budget a little longer; an actual cost above it is
    recorded as an overrun (give the agent the estimate as its hard cap, e.g.
    ``max_tokens``).
    """

    usd: NonNegative | None = None
    model: str | None = None
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cpu_s: NonNegative = 0.0


class PriorityClass(SpecModel):
    """A priority class: the fleet's one definition, read by budgets and admission.

    For budgets it is a class of agents (mapped from pools by ``pool_classes``):
    ``weight`` scales an agent's share of the surplus (weighted allocation and weighted
    preemption), and with ``reserve_for_growth`` the minimum of every agent of this
    class that may still join (up to its pools' ``max_agents``) is held in reserve, so
    agents joining late in the day still get their minimum.

    For admission control (``pools[].admission``) it is a class of tasks: a task
    belongs to the first class (highest first) whose ``min_task_priority`` its
    ``priority`` reaches (the lowest class takes the rest; a class without one holds no
    tasks), and may be predicted to wait at most ``shed_wait_share`` of its pool's
    ``max_queue_wait_s`` (and of the time left to its deadline) before it is refused.
    Lower classes take smaller shares, so they are refused first.
    """

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_-]*$")
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    reserve_for_growth: bool = False
    min_task_priority: int | None = Field(default=None, ge=0, le=9)
    shed_wait_share: Share = 1.0


def _check_task_classes(classes: Sequence[PriorityClass]) -> None:
    """Classes are listed highest first. Those that hold tasks (a ``min_task_priority``
    set; the lowest class always: it takes every task no higher class takes) have
    ``min_task_priority`` falling strictly, the lowest's 0 if set, and a
    ``shed_wait_share`` that never grows downwards (a lower class is never shed after
    a higher one). A spec that sets no ``min_task_priority`` puts every task in its
    lowest class."""
    holding = [
        (i, c)
        for i, c in enumerate(classes)
        if c.min_task_priority is not None or i == len(classes) - 1
    ]
    for (_, hi), (j, lo) in itertools.pairwise(holding):
        lo_min = 0 if lo.min_task_priority is None else lo.min_task_priority
        assert hi.min_task_priority is not None  # only the last may hold none
        if lo_min >= hi.min_task_priority:
            raise ValueError(
                f"priority_classes.{j}.min_task_priority: {lo_min} must be below the "
                f"class above it ({hi.name}: {hi.min_task_priority}); classes are listed "
                "highest first"
            )
        if lo.shed_wait_share > hi.shed_wait_share:
            raise ValueError(
                f"priority_classes.{j}.shed_wait_share: {_num(lo.shed_wait_share)} is "
                f"above the class above it ({hi.name}: {_num(hi.shed_wait_share)}); a "
                "lower class must not be shed after a higher one"
            )
    last = classes[-1]
    if last.min_task_priority not in (None, 0):
        raise ValueError(
            f"priority_classes.{len(classes) - 1}.min_task_priority: the lowest class "
            f"({last.name}) takes every task no higher class takes: leave it unset or 0"
        )


class BudgetsSpec(SpecModel):
    """Prices, the fleet's daily USD budget and its sharing rules, and fixed quotas.

    ``allocation``: ``equal``, ``weighted`` (by class weight), ``resource`` (by agent
    size) or ``dynamic`` (max-min fair over each agent's projected demand: agents that
    need more may claim more). ``preemption``: ``strict`` hands the surplus above the
    minimums to higher classes first, ``weighted`` shares it across classes by weight;
    minimums always go to higher classes first. Allocations are recomputed every
    ``rebalance_interval_s`` and whenever agents join or leave; an agent's demand is its
    spend so far plus its burn rate over ``burn_rate_window_s`` projected to the end of
    the day, times ``demand_headroom``. An alert fires when a budget's usage passes each
    share in ``alert_thresholds`` of its limit (or allocation).
    """

    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    daily_usd: NonNegative | None = None
    hourly_usd: NonNegative | None = None
    per_agent_min_usd: NonNegative = 0.0
    per_agent_max_usd: NonNegative | None = None
    allocation: Literal["equal", "weighted", "resource", "dynamic"] = "dynamic"
    preemption: Literal["strict", "weighted"] = "strict"
    priority_classes: list[PriorityClass] = Field(
        default_factory=lambda: [PriorityClass(name=DEFAULT_PRIORITY_CLASS)], min_length=1
    )
    default_priority_class: str | None = None
    pool_classes: dict[str, str] = Field(default_factory=dict)
    per_agent: ScopeLimits = ScopeLimits()
    pools: dict[str, ScopeLimits] = Field(default_factory=dict)
    tenants: dict[str, ScopeLimits] = Field(default_factory=dict)
    alert_thresholds: tuple[Share, ...] = DEFAULT_ALERT_THRESHOLDS
    rebalance_interval_s: float = Field(
        default=DEFAULT_REBALANCE_INTERVAL_S, gt=0, allow_inf_nan=False
    )
    burn_rate_window_s: float = Field(
        default=DEFAULT_BURN_RATE_WINDOW_S, gt=0, allow_inf_nan=False
    )
    demand_headroom: float = Field(default=DEFAULT_DEMAND_HEADROOM, ge=1, allow_inf_nan=False)
    task_estimates: dict[str, TaskEstimate] = Field(default_factory=dict)
    """Per pool name, what one task may cost at most (reserved before it runs)."""
    default_task_estimate: TaskEstimate = TaskEstimate()
    reservation_grace_s: float = Field(
        default=DEFAULT_RESERVATION_GRACE_S, gt=0, allow_inf_nan=False
    )
    """A reservation not settled within ``resilience.task_timeout_s`` plus this grace
    belongs to a host that died: the budget actor settles it at its estimate."""

    @model_validator(mode="after")
    def _check(self) -> BudgetsSpec:
        lo, hi = self.per_agent_min_usd, self.per_agent_max_usd
        if hi is not None and lo > hi:
            raise ValueError(
                f"per_agent_min_usd ({_num(lo)}) must be <= per_agent_max_usd ({_num(hi)})"
            )
        if lo > 0 and self.daily_usd is None:
            raise ValueError(
                f"per_agent_min_usd ({_num(lo)}) needs daily_usd: it is a share "
                "of the fleet's daily budget"
            )
        if self.daily_usd is not None and lo > self.daily_usd:
            raise ValueError(
                f"per_agent_min_usd {_num(lo)} x 1 agent = {_num(lo)} > "
                f"daily_usd {_num(self.daily_usd)}"
            )
        if self.daily_usd is not None and self.per_agent.daily_usd is not None:
            raise ValueError(
                "per_agent.daily_usd cannot be combined with daily_usd: an "
                "agent's daily USD is its allocation, bounded by "
                "per_agent_min_usd and per_agent_max_usd"
            )
        names = [c.name for c in self.priority_classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"priority_classes: {dupes} named more than once")
        _check_task_classes(self.priority_classes)
        for where, cls in [
            ("default_priority_class", self.default_priority_class),
            *((f"pool_classes.{p}", c) for p, c in self.pool_classes.items()),
        ]:
            if cls is not None and cls not in names:
                raise ValueError(
                    f"{where}: unknown priority class {cls!r} (classes: {', '.join(names)})"
                )
        for where, est in [
            ("default_task_estimate", self.default_task_estimate),
            *((f"task_estimates.{p}", e) for p, e in self.task_estimates.items()),
        ]:
            if est.model is not None and est.model not in self.prices:
                raise ValueError(
                    f"{where}.model: no price for model {est.model!r} "
                    f"(prices: {', '.join(self.prices) or 'none'})"
                )
        t = self.alert_thresholds
        if list(t) != sorted(set(t)):
            raise ValueError(f"alert_thresholds {list(t)} must be increasing, without repeats")
        return self

    @property
    def class_names(self) -> list[str]:
        """Priority class names, highest first."""
        return [c.name for c in self.priority_classes]

    @property
    def fallback_class(self) -> str:
        """The class of an agent whose pool has none: ``default_priority_class``, else
        the lowest class."""
        return self.default_priority_class or self.priority_classes[-1].name

    def class_of_pool(self, pool: str) -> str:
        return self.pool_classes.get(pool, self.fallback_class)

    def class_of_task(self, priority: int) -> PriorityClass:
        """The class of a task of ``priority``: the first (highest) whose
        ``min_task_priority`` it reaches, else the lowest."""
        for c in self.priority_classes:
            if c.min_task_priority is not None and priority >= c.min_task_priority:
                return c
        return self.priority_classes[-1]

    @property
    def enforced(self) -> bool:
        """Whether any budget is set: only then does the runtime reserve and settle."""
        return (
            self.daily_usd is not None
            or self.hourly_usd is not None
            or self.per_agent_max_usd is not None
            or bool(self.per_agent.limits())
            or any(v.limits() for v in self.pools.values())
            or any(v.limits() for v in self.tenants.values())
        )

    def estimate_for(self, pool: str) -> tuple[float, int, float]:
        """(USD, tokens, CPU s) to reserve for one task of ``pool``."""
        est = self.task_estimates.get(pool, self.default_task_estimate)
        tokens = est.input_tokens + est.output_tokens
        if est.usd is not None:
            return est.usd, tokens, est.cpu_s
        price = self.prices.get(est.model) if est.model is not None else None
        usd = price.cost_usd(est.input_tokens, est.output_tokens) if price else 0.0
        return usd, tokens, est.cpu_s


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def check_budget_covers(
    budgets: BudgetsSpec | Mapping[str, Any], pools: Sequence[Any]
) -> None:
    """Reject a budget whose per-agent minimum the daily total cannot cover at full size.

    Call it from ``FleetSpec``'s validator (it needs the pools). ``max_agents`` is the
    sum of the pools' ``autoscaling.max_agents``; pools and budgets may be models or
    plain mappings. Also checks that ``pool_classes`` and ``pools`` name existing pools.
    Raises ValueError with the arithmetic, e.g. ``budgets.per_agent_min_usd 50 x
    max_agents 2000 = 100000 > budgets.daily_usd 50000``.
    """
    if isinstance(budgets, Mapping):
        budgets = BudgetsSpec.model_validate(budgets)
    names: list[str] = []
    max_agents = 0
    parts = []
    for p in pools:
        name = str(_get(p, "name"))
        scaling = _get(p, "autoscaling") or {}
        n = int(_get(scaling, "max_agents", 100))  # AutoscalingSpec's default
        names.append(name)
        max_agents += n
        parts.append(f"{name} {n}")
    for section in ("pool_classes", "pools", "task_estimates"):
        for pool in getattr(budgets, section):
            if pool not in names:
                raise ValueError(
                    f"budgets.{section}.{pool}: no pool named {pool!r} "
                    f"(pools: {', '.join(names)})"
                )
    lo, daily = budgets.per_agent_min_usd, budgets.daily_usd
    if daily is None or lo == 0:
        return
    need = lo * max_agents
    if need > daily * (1 + 1e-12):
        raise ValueError(
            f"budgets.per_agent_min_usd {_num(lo)} x max_agents {max_agents} = {_num(need)} "
            f"> budgets.daily_usd {_num(daily)} (max_agents is the sum of the pools' "
            f"autoscaling.max_agents: {', '.join(parts)})"
        )
