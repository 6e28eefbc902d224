"""Observability section: what fleet's metrics may label, the latency target and the
share of refused tasks its alert rules hold the fleet to, how much of an agent's
traceback a failed result keeps, the format of the fleet's logs, and trace sampling.

``metric_tenants`` are the tenants whose tasks carry their own ``tenant`` label value in
the metrics; with the tenants that ``budgets.tenants`` names, they are the only tenant
values a series ever has. Every other tenant (from an API key's scope or a payload's
``tenant`` field) is counted as ``other``, and a task with no tenant as ``none``, so ten
thousand tenants in payloads add no series (``fleet.observability.metrics``).
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from fleet.spec._base import SpecModel
from fleet.spec._types import Share

DEFAULT_LATENCY_TARGET_S = 30.0
DEFAULT_TRACEBACK_CHARS = 4000
MAX_TRACEBACK_CHARS = 100_000
DEFAULT_SAMPLE_RATIO = 0.01
MAX_METRIC_TENANTS = 100
DEFAULT_SHED_ALERT_SHARE = 0.1


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class TracingSpec(SpecModel):
    """OpenTelemetry spans for tasks (``fleet.observability.tracing``).

    A task submitted with a W3C ``traceparent`` is traced when that parent is sampled;
    ``sample_ratio`` is the share of the other tasks traced as traces of their own
    (0 turns those off). ``setup`` names a ``module:function`` that each fleet process
    calls once to install an OpenTelemetry ``TracerProvider`` (an exporter of your
    choice); without it, spans go to whatever provider the process already has, which by
    default records nothing. The provider's own sampler applies on top of this choice
    (the SDK's default, parent-based always-on, keeps every span fleet makes).
    """

    sample_ratio: float = Field(default=DEFAULT_SAMPLE_RATIO, ge=0.0, le=1.0)
    setup: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$")


class ObservabilitySpec(SpecModel):
    """Metrics labels, alert targets, failure detail, logs and traces."""

    metric_tenants: tuple[str, ...] = Field(default=(), max_length=MAX_METRIC_TENANTS)
    # Under the latency histograms' top finite bucket (300 s): above it, a p95 cannot
    # be told from the bucket's bound and the alert could never fire.
    latency_target_s: float = Field(default=DEFAULT_LATENCY_TARGET_S, gt=0, lt=300)
    traceback_chars: int = Field(default=DEFAULT_TRACEBACK_CHARS, ge=0, le=MAX_TRACEBACK_CHARS)
    log_format: LogFormat = LogFormat.TEXT
    tracing: TracingSpec = TracingSpec()
    # The share of a pool's tasks admission control may refuse (over 5 minutes) before
    # the FleetSheddingHigh alert fires.
    shed_alert_share: Share = DEFAULT_SHED_ALERT_SHARE
