"""Scenario spec of the simulator: a fleet spec plus the workload, failures and chaos.

A scenario embeds a fleet spec (``fleet:``, the same mapping ``fleet.spec.parse_spec``
takes) or references one (``fleet_file:``, relative to the scenario file), and says
how the world behaves around it: arrivals per pool (Poisson with bursts and a diurnal
cycle, or a trace file of timestamps), service-time distributions, slow agents, token
use, failures, agent start-up time and chaos. Times are seconds of virtual time from
the start of the run.

``load_scenario`` rejects bad input with the YAML line and the field path of each
problem (and, for a trace file, the line of the trace at fault).
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from fleet.agents.llm import LatencyModel
from fleet.spec import FleetSpec, SpecError, load_spec
from fleet.spec._base import SpecModel
from fleet.task import MAX_PRIORITY

DEFAULT_RATE_STEP_S = 1.0
DEFAULT_RESTART_DELAY_S = 5.0
DEFAULT_DRAIN_TIMEOUT_S = 3600.0
DEFAULT_SAMPLE_INTERVAL_S = 1.0
DEFAULT_PAYLOAD_BYTES = 512
DEFAULT_ERROR_TEXT = "RuntimeError: simulated upstream error"


class _Model(SpecModel):
    """SpecModel (strict, frozen, unknown keys rejected) that also refuses inf and NaN."""

    model_config = ConfigDict(**{**SpecModel.model_config, "allow_inf_nan": False})


# -- distributions of durations (seconds) -----------------------------------------------
class ConstantDuration(_Model):
    """Always ``value_s``."""

    kind: Literal["constant"]
    value_s: float = Field(ge=0)

    @property
    def mean_s(self) -> float:
        return self.value_s


class ExponentialDuration(_Model):
    """Exponential with mean ``mean_s`` (memoryless: the M in M/M/c)."""

    kind: Literal["exponential"]
    mean_s: float = Field(gt=0)


class LognormalDuration(_Model):
    """Lognormal with median ``median_s`` and log-space standard deviation ``sigma``."""

    kind: Literal["lognormal"]
    median_s: float = Field(gt=0)
    sigma: float = Field(ge=0)

    @property
    def mean_s(self) -> float:
        return self.median_s * math.exp(self.sigma**2 / 2)


class UniformDuration(_Model):
    """Uniform on [``low_s``, ``high_s``]."""

    kind: Literal["uniform"]
    low_s: float = Field(ge=0)
    high_s: float = Field(ge=0)

    @model_validator(mode="after")
    def _check_order(self) -> UniformDuration:
        if self.low_s > self.high_s:
            raise ValueError(f"low_s ({self.low_s}) must be <= high_s ({self.high_s})")
        return self

    @property
    def mean_s(self) -> float:
        return (self.low_s + self.high_s) / 2


class GammaDuration(_Model):
    """Gamma with mean ``mean_s`` and coefficient of variation ``cv`` (cv=1: exponential)."""

    kind: Literal["gamma"]
    mean_s: float = Field(gt=0)
    cv: float = Field(gt=0)


class WeibullDuration(_Model):
    """Weibull with scale ``scale_s`` and shape ``shape`` (shape < 1: heavy tail)."""

    kind: Literal["weibull"]
    scale_s: float = Field(gt=0)
    shape: float = Field(gt=0)

    @property
    def mean_s(self) -> float:
        return self.scale_s * math.gamma(1 + 1 / self.shape)


class ParetoDuration(_Model):
    """Pareto with minimum ``scale_s`` and tail index ``alpha``, capped at ``max_s`` if set."""

    kind: Literal["pareto"]
    scale_s: float = Field(gt=0)
    alpha: float = Field(gt=0)
    max_s: float | None = Field(default=None, gt=0)

    @property
    def mean_s(self) -> float:
        # The uncapped mean; with a cap the true mean is lower (used only for reporting).
        return self.alpha * self.scale_s / (self.alpha - 1) if self.alpha > 1 else math.inf


_LLM = LatencyModel()


class LLMDuration(_Model):
    """fleet's LLM latency model (``fleet.agents.llm.LatencyModel``, whose defaults these
    are): a lognormal time to first token plus lognormal output tokens at
    ``tokens_per_s``, all times ``time_scale``."""

    kind: Literal["llm"]
    ttft_median_s: float = Field(default=_LLM.ttft_median_s, gt=0)
    ttft_sigma: float = Field(default=_LLM.ttft_sigma, ge=0)
    tokens_per_s: float = Field(default=_LLM.tokens_per_s, gt=0)
    output_tokens_median: float = Field(default=_LLM.output_tokens_median, gt=0)
    output_tokens_sigma: float = Field(default=_LLM.output_tokens_sigma, ge=0)
    time_scale: float = Field(default=_LLM.time_scale, gt=0)

    def latency_model(self) -> LatencyModel:
        return LatencyModel(**self.model_dump(exclude={"kind"}))

    @property
    def mean_s(self) -> float:
        return self.latency_model().mean_s


DurationDist = Annotated[
    ConstantDuration
    | ExponentialDuration
    | LognormalDuration
    | UniformDuration
    | GammaDuration
    | WeibullDuration
    | ParetoDuration
    | LLMDuration,
    Field(discriminator="kind"),
]


def mean_duration_s(dist: Any) -> float:
    """Mean of a duration distribution in seconds (for reports and sanity checks)."""
    return float(dist.mean_s)


# -- distributions of token counts --------------------------------------------------------
class ConstantCount(_Model):
    kind: Literal["constant"]
    value: int = Field(ge=0)

    @property
    def mean(self) -> float:
        return float(self.value)


class LognormalCount(_Model):
    """Rounded lognormal count with median ``median`` and log-space sigma ``sigma``."""

    kind: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


class UniformCount(_Model):
    kind: Literal["uniform"]
    low: int = Field(ge=0)
    high: int = Field(ge=0)

    @model_validator(mode="after")
    def _check_order(self) -> UniformCount:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2


CountDist = Annotated[
    ConstantCount | LognormalCount | UniformCount, Field(discriminator="kind")
]


# -- arrivals ----------------------------------------------------------------------------
class Burst(_Model):
    """The arrival rate times ``multiplier`` from ``start_s`` for ``duration_s``, reached
    and left over linear ramps of ``ramp_s`` each (inside the duration)."""

    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    multiplier: float = Field(ge=0)
    ramp_s: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check_ramp(self) -> Burst:
        if 2 * self.ramp_s > self.duration_s:
            raise ValueError(
                f"ramp_s ({self.ramp_s}) must be at most half of "
                f"duration_s ({self.duration_s})"
            )
        return self


class Diurnal(_Model):
    """rate x (1 + amplitude x cos(2 pi (t - peak_s) / period_s))."""

    amplitude: float = Field(ge=0, le=1)
    period_s: float = Field(default=86_400.0, gt=0)
    peak_s: float = Field(default=0.0, ge=0)


class RandomBursts(_Model):
    """Bursts at random times (a Markov-modulated Poisson process): quiet spells of mean
    ``mean_gap_s`` alternate with bursts of mean ``mean_duration_s`` at ``multiplier``."""

    mean_gap_s: float = Field(gt=0)
    mean_duration_s: float = Field(gt=0)
    multiplier: float = Field(ge=0)


class PoissonArrivals(_Model):
    """Poisson arrivals at ``rate_per_s``, optionally shaped by a diurnal cycle and
    bursts (non-homogeneous: the rate is held constant over steps of ``rate_step_s``)."""

    kind: Literal["poisson"]
    rate_per_s: float = Field(ge=0)
    diurnal: Diurnal | None = None
    bursts: list[Burst] = Field(default_factory=list)
    random_bursts: RandomBursts | None = None
    rate_step_s: float = Field(default=DEFAULT_RATE_STEP_S, gt=0)

    @property
    def shaped(self) -> bool:
        return bool(self.diurnal or self.bursts or self.random_bursts)


class TraceArrivals(_Model):
    """Arrivals at the timestamps of a text file: one number of seconds per line, in
    non-decreasing order (blank lines and ``#`` comments are skipped), times ``time_scale``.
    A relative ``path`` is relative to the scenario file."""

    kind: Literal["trace"]
    path: str = Field(min_length=1)
    time_scale: float = Field(default=1.0, gt=0)
    _times: array = PrivateAttr(default_factory=lambda: array("d"))

    @model_validator(mode="after")
    def _read(self, info: ValidationInfo) -> TraceArrivals:
        base = (info.context or {}).get("base_dir") if info is not None else None
        path = Path(self.path)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        self._times = read_trace(path)
        return self

    @property
    def times(self) -> array:
        """The timestamps in seconds (before ``time_scale``)."""
        return self._times


ArrivalsSpec = Annotated[PoissonArrivals | TraceArrivals, Field(discriminator="kind")]


def read_trace(path: Path) -> array:
    """Read a trace of arrival timestamps; ValueError names the file line at fault."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"trace {path}: {exc.strerror or exc}") from None
    out = array("d")
    prev, prev_line = -math.inf, 0
    for n, raw in enumerate(text.splitlines(), start=1):
        s = raw.split("#", 1)[0].strip()
        if not s:
            continue
        try:
            t = float(s)
        except ValueError:
            raise ValueError(
                f"trace {path} line {n}: {s!r} is not a number of seconds"
            ) from None
        if not math.isfinite(t) or t < 0:
            raise ValueError(
                f"trace {path} line {n}: timestamp {s} must be a finite number >= 0"
            )
        if t < prev:
            raise ValueError(
                f"trace {path} line {n}: timestamp {t:g} is earlier than the previous one "
                f"({prev:g}, line {prev_line}); timestamps must be in non-decreasing order"
            )
        out.append(t)
        prev, prev_line = t, n
    if not out:
        raise ValueError(f"trace {path}: no timestamps")
    return out


class StreamSpec(_Model):
    """One source of tasks for one pool. ``tenants`` maps tenant name to its share of
    the stream's tasks (weights, normalized); without it every task is tenant ``pool``.

    For task-aware routers: ``task_types`` maps a task type (``payload["type"]`` live)
    to its share of the stream's tasks (weights; untyped tasks have the pool's
    capability as their type, as live); ``affinity_keys``: each task carries one of
    this many affinity keys, drawn uniformly (0: none).

    For overload (``fleet.sim.overload``): ``priorities`` maps a task priority (0-9,
    the task's ``priority``; its class is the fleet's ``budgets.priority_classes``) to
    its share of the stream's tasks (weights; without it every task has priority 0);
    ``deadline_s``: each task's deadline, that long after it arrives (none without it)."""

    pool: str
    arrivals: ArrivalsSpec
    tenants: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    task_types: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    affinity_keys: int = Field(default=0, ge=0)
    priorities: dict[
        Annotated[int, Field(ge=0, le=MAX_PRIORITY)], Annotated[float, Field(gt=0)]
    ] = Field(default_factory=dict)
    deadline_s: float | None = Field(default=None, gt=0)


# -- pool behaviour ----------------------------------------------------------------------
class Heterogeneity(_Model):
    """A ``slow_share`` of the agents (drawn as each starts) is ``slowdown`` times slower."""

    slow_share: float = Field(default=0.0, ge=0, le=1)
    slowdown: float = Field(default=1.0, ge=1)


class Failures(_Model):
    """Each execution fails with ``task_failure_prob`` (reason ``error``, text ``error``:
    the fleet's retry policy classifies it by the exception name it starts with, and
    retries it or records it as failed); each agent crashes at
    ``crash_rate_per_agent_per_h`` (its tasks go back to the queue) and is restarted
    after ``restart_delay_s`` plus its start-up time. A ``bad_agent_share`` of the
    agents (spread evenly over the creation order) fail ``bad_agent_failure_prob`` of
    their tasks instead (what breakers and the success-rate router are for)."""

    task_failure_prob: float = Field(default=0.0, ge=0, le=1)
    bad_agent_share: float = Field(default=0.0, ge=0, le=1)
    bad_agent_failure_prob: float = Field(default=1.0, ge=0, le=1)
    error: str = DEFAULT_ERROR_TEXT
    crash_rate_per_agent_per_h: float = Field(default=0.0, ge=0)
    restart_delay_s: float = Field(default=DEFAULT_RESTART_DELAY_S, ge=0)


class Tokens(_Model):
    """LLM tokens used per execution, priced with ``fleet.budgets.prices[model]``."""

    model: str
    input_tokens: CountDist
    output_tokens: CountDist


class PoolModel(_Model):
    """How one pool's agents behave in the simulation.

    ``agent_queue_limit`` is how many tasks an agent may hold *waiting* beyond its
    concurrency: 0 (the live default) keeps waiting work in the pool's queue until a slot
    is free; a large value routes each task to an agent at once (the supermarket model).
    ``dispatch_overhead_s`` is the cost of one dispatcher call, paid by each task of the
    batch it carries. ``agent_usd_per_hour`` is the running cost of one agent.
    ``experts`` maps a task type to the share of agents expert in it (spread evenly over
    the creation order, the first type's share first; an agent has at most one), for
    the specialization router.
    """

    service: DurationDist
    startup: DurationDist = ConstantDuration(kind="constant", value_s=0.0)
    heterogeneity: Heterogeneity = Heterogeneity()
    failures: Failures = Failures()
    tokens: Tokens | None = None
    agent_usd_per_hour: float = Field(default=0.0, ge=0)
    agent_queue_limit: int = Field(default=0, ge=0)
    payload_bytes: int = Field(default=DEFAULT_PAYLOAD_BYTES, ge=1)
    dispatch_overhead_s: float = Field(default=0.0, ge=0)
    experts: dict[str, Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_experts(self) -> PoolModel:
        total = sum(self.experts.values())
        if total > 1 + 1e-9:
            raise ValueError(f"experts: the shares add up to {total:g}, over 1")
        return self


# -- chaos -------------------------------------------------------------------------------
class KillChaos(_Model):
    """Kill a share ``share`` of a pool's agents (all pools when ``pool`` is unset), in
    ``waves`` waves at random times within [``start_s``, ``end_s``]; each wave kills
    ``share / waves`` of the agents serving at that moment (at least one)."""

    pool: str | None = None
    share: float = Field(gt=0, le=1)
    waves: int = Field(default=1, ge=1)
    start_s: float = Field(ge=0)
    end_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check_window(self) -> KillChaos:
        if self.end_s is not None and self.end_s < self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be >= start_s ({self.start_s})")
        return self


class SlowdownChaos(_Model):
    """Make a share of a pool's agents ``factor`` times slower for ``duration_s``
    (a huge factor hangs them: their tasks then end by ``task_timeout_s``)."""

    pool: str
    share: float = Field(gt=0, le=1)
    factor: float = Field(gt=0)
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)


class PartitionChaos(_Model):
    """Cut a pool off from the dispatcher for ``duration_s``: nothing new is sent to it,
    and outcomes finished meanwhile reach the ledger only when the partition heals."""

    pool: str
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)


class ChaosSpec(_Model):
    kills: list[KillChaos] = Field(default_factory=list)
    slowdowns: list[SlowdownChaos] = Field(default_factory=list)
    partitions: list[PartitionChaos] = Field(default_factory=list)


# -- targets -----------------------------------------------------------------------------
class ClassTargets(_Model):
    """Targets for one priority class of a pool (``budgets.priority_classes``): the p99
    latency of its completed tasks and the largest share of it admission may refuse."""

    p99_latency_s: float | None = Field(default=None, gt=0)
    max_shed_share: float | None = Field(default=None, ge=0, le=1)


class PoolTargets(_Model):
    p99_latency_s: float | None = Field(default=None, gt=0)
    classes: dict[str, ClassTargets] = Field(default_factory=dict)


class Targets(_Model):
    """What the report checks: tail latency (all pools, and per pool), the longest
    recovery after a chaos kill, and the cost per 1,000 tasks. Lost tasks must be 0
    and the autoscaler must stay within its bounds and rates, always."""

    p99_latency_s: float | None = Field(default=None, gt=0)
    recovery_s: float | None = Field(default=None, gt=0)
    max_usd_per_1000_tasks: float | None = Field(default=None, gt=0)
    pools: dict[str, PoolTargets] = Field(default_factory=dict)


# -- the scenario ------------------------------------------------------------------------
class Scenario(_Model):
    """A fleet, the world around it, and what it should achieve.

    Arrivals stop at ``duration_s`` or after ``max_tasks`` tasks (whichever comes first);
    the run then continues until every task has an outcome, for at most
    ``drain_timeout_s``. Tasks submitted before ``warmup_s`` are accounted for but left
    out of the latency statistics. Series are sampled every ``sample_interval_s``.
    """

    name: str = Field(min_length=1)
    description: str = ""
    seed: int = 0
    fleet: FleetSpec
    pools: dict[str, PoolModel]
    workload: list[StreamSpec] = Field(min_length=1)
    chaos: ChaosSpec = ChaosSpec()
    targets: Targets = Targets()
    duration_s: float | None = Field(default=None, gt=0)
    max_tasks: int | None = Field(default=None, ge=1)
    warmup_s: float = Field(default=0.0, ge=0)
    drain_timeout_s: float = Field(default=DEFAULT_DRAIN_TIMEOUT_S, gt=0)
    sample_interval_s: float = Field(default=DEFAULT_SAMPLE_INTERVAL_S, gt=0)

    @model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        # Each problem is "path: reason", so the loader can point at the field and line.
        errs: list[str] = []
        names = [p.name for p in self.fleet.pools]
        known = ", ".join(names)
        for name in self.pools:
            if name not in names:
                errs.append(f"pools.{name}: {name!r} is not a pool of the fleet ({known})")
        for i, st in enumerate(self.workload):
            if st.pool not in names:
                errs.append(
                    f"workload.{i}.pool: {st.pool!r} is not a pool of the fleet ({known})"
                )
            elif st.pool not in self.pools:
                errs.append(
                    f"workload.{i}.pool: pool {st.pool!r} receives work but has no "
                    f"entry under pools (its service time is needed)"
                )
        prices = self.fleet.budgets.prices
        for name, pm in self.pools.items():
            if pm.tokens is not None and pm.tokens.model not in prices:
                errs.append(
                    f"pools.{name}.tokens.model: {pm.tokens.model!r} has no price in "
                    f"fleet.budgets.prices ({', '.join(prices) or 'none'})"
                )
            if (
                isinstance(pm.service, ParetoDuration)
                and pm.service.alpha <= 1
                and pm.service.max_s is None
            ):
                errs.append(
                    f"pools.{name}.service.alpha: alpha {pm.service.alpha} <= 1 has "
                    f"an infinite mean; give max_s"
                )
        for section in ("kills", "slowdowns", "partitions"):
            for i, c in enumerate(getattr(self.chaos, section)):
                if c.pool is not None and c.pool not in names:
                    errs.append(
                        f"chaos.{section}.{i}.pool: {c.pool!r} is not a pool of the "
                        f"fleet ({known})"
                    )
        classes = self.fleet.budgets.class_names
        for name, pt in self.targets.pools.items():
            if name not in names:
                errs.append(
                    f"targets.pools.{name}: {name!r} is not a pool of the fleet ({known})"
                )
            for cls in pt.classes:
                if cls not in classes:
                    errs.append(
                        f"targets.pools.{name}.classes.{cls}: {cls!r} is not a priority "
                        f"class of the fleet ({', '.join(classes)})"
                    )
        open_ended = [
            i for i, st in enumerate(self.workload) if isinstance(st.arrivals, PoissonArrivals)
        ]
        if open_ended and self.duration_s is None and self.max_tasks is None:
            errs.append(
                f"duration_s: Poisson arrivals (workload.{open_ended[0]}) never end: "
                "give duration_s or max_tasks"
            )
        if errs:
            raise ValueError("\n".join(errs))
        return self

    def pool_model(self, name: str) -> PoolModel:
        return self.pools[name]


# -- loading with line numbers -----------------------------------------------------------
class ScenarioError(ValueError):
    """An invalid scenario: ``errors`` holds a ``(field_path, line or None, reason)`` each."""

    def __init__(self, source: str, errors: list[tuple[str, int | None, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(
            f"  {source}:{line}: {path}: {reason}" if line else f"  {source}: {path}: {reason}"
            for path, line, reason in errors
        )
        super().__init__(f"invalid scenario {source}:\n{lines}")


_PATH_PREFIX = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*): (.+)$", re.S)
_MERGE = "<<"


def _find_key(node: yaml.Node, part: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key, value) nodes of ``part`` in a mapping node, following ``<<`` merges."""
    merges = []
    for k, v in node.value:
        if k.value == _MERGE:
            merges.extend(v.value if isinstance(v, yaml.SequenceNode) else [v])
        elif str(k.value) == part:
            return k, v
    for m in merges:
        if isinstance(m, yaml.MappingNode):
            found = _find_key(m, part)
            if found is not None:
                return found
    return None


def _locate(loc: Iterable[Any], data: Any, root: yaml.Node | None) -> tuple[str, int | None]:
    """Display path and 1-based YAML line for a pydantic error location.

    Pydantic puts a discriminated union's tag into the location ("service.lognormal.
    sigma"); such parts are dropped from the path. The line is the deepest node of the
    path that exists in the file (a missing field points at its parent).
    """
    parts: list[str] = []
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    for part in loc:
        if isinstance(data, dict) and part not in data and data.get("kind") == part:
            continue  # a discriminator tag, not a field
        parts.append(str(part))
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            data = None
        if isinstance(node, yaml.MappingNode):
            found = _find_key(node, str(part))
            if found is None:
                node = None
                continue
            line = found[0].start_mark.line + 1
            node = found[1]
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            node = None
    return ".".join(parts) or "<root>", line


def _subtree(data: Any, loc: Iterable[Any]) -> Any:
    for part in loc:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _errors(
    exc: ValidationError, data: Any, root: yaml.Node | None
) -> list[tuple[str, int | None, str]]:
    out = []
    for err in exc.errors():
        loc = list(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the scenario spec)"
        for piece in msg.split("\n"):
            where = loc
            m = _PATH_PREFIX.match(piece)
            # A validator may name the field it faults as "a.b.c: reason", relative to
            # the model it validates; accept that only when the path exists there.
            here = _subtree(data, loc)
            first = m.group(1).split(".")[0] if m else ""
            if (
                m
                and isinstance(here, dict)
                and (first in here or (not loc and first in Scenario.model_fields))
            ):
                where = loc + [int(p) if p.isdigit() else p for p in m.group(1).split(".")]
                piece = m.group(2)
            path, line = _locate(where, data, root)
            out.append((path, line, piece))
    return out


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text)
    except yaml.YAMLError:
        return None


def _load_fleet_file(path: Path, source: str, line: int | None) -> FleetSpec:
    try:
        return load_spec(path)
    except SpecError as exc:
        try:
            text = path.read_text()
            root, data = _compose(text), yaml.safe_load(text)
        except (OSError, yaml.YAMLError):
            root, data = None, None
        errs = []
        for p, reason in exc.errors:
            loc = [int(x) if x.isdigit() else x for x in p.split(".")] if p[:1] != "<" else []
            _, fline = _locate(loc, data, root)
            where = f"{path}:{fline}" if fline else str(path)
            errs.append((f"fleet_file -> {where}: {p}", line, reason))
        raise ScenarioError(source, errs) from None


def parse_scenario(
    data: Any,
    source: str = "<dict>",
    base_dir: str | Path | None = None,
    _root: yaml.Node | None = None,
) -> Scenario:
    """Validate a mapping as a Scenario; ScenarioError lists each problem with its path."""
    if not isinstance(data, dict):
        raise ScenarioError(
            source, [("<root>", None, f"expected a mapping, got {type(data).__name__}")]
        )
    data = dict(data)
    if "fleet_file" in data:
        ref = data.pop("fleet_file")
        _, line = _locate(["fleet_file"], {"fleet_file": ref}, _root)
        if "fleet" in data:
            raise ScenarioError(
                source, [("fleet_file", line, "give either fleet or fleet_file, not both")]
            )
        if not isinstance(ref, str):
            raise ScenarioError(source, [("fleet_file", line, "expected a path")])
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        data["fleet"] = _load_fleet_file(path, source, line)
    try:
        return Scenario.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ScenarioError(source, _errors(exc, data, _root)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a YAML scenario; errors carry the YAML line and the field path."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(str(path), [("<file>", None, exc.strerror or str(exc))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ScenarioError(
            str(path), [("<yaml>", mark.line + 1 if mark else None, str(exc))]
        ) from None
    return parse_scenario(data, str(path), path.parent, _compose(text))
