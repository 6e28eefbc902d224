"""OpenTelemetry traces of tasks: where a task's time went, under its submitter's span.

A traced task gets five spans, all made after its outcome is recorded, from the
wall-clock times the runtime noted on the way (``TaskTimes``)::

    <submitter's span>               (from the task's W3C ``traceparent``; none: a new trace)
    └── fleet.task                   submitted -> recorded
        ├── fleet.queue_wait         submitted -> sent      (in a queue shard)
        ├── fleet.dispatch           sent -> started        (to a host, then to a free agent)
        ├── fleet.execution          started -> finished    (the agent's run)
        └── fleet.recording          finished -> recorded   (until durable in the ledger)

Why one ``fleet.task`` span above the four phases rather than four siblings under the
submitter's span: a task submitted without a ``traceparent`` needs one root to make a
single trace of its phases, and a submitter that sends many tasks under one span sees
each task's phases grouped under it instead of interleaved. The four phase spans share
the submitter's trace id and descend from its span id either way.

``fleet.dispatch`` ends when the agent starts, not when the host receives the batch: the
wait for a free agent on the host is part of getting the task to an agent, and this way
the four phases tile the task's life with no gap. The host's receipt is an event
(``fleet.received``) on the dispatch span.

Cost: a task that is not traced costs one call to ``TaskTracer.wants``; with no
OpenTelemetry SDK provider installed (OpenTelemetry's default proxy), that call is one
attribute check, and nothing is parsed or allocated. Spans are only made for tasks
``wants`` chose, after the fact with explicit times, so tracing adds nothing to a task's
own latency.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleet.runtime.imports import import_object
from fleet.spec.observability import TracingSpec
from fleet.task import Item, TaskStatus

log = logging.getLogger(__name__)

TRACER_NAME = "fleet"
SPAN_TASK = "fleet.task"
SPAN_QUEUE_WAIT = "fleet.queue_wait"
SPAN_DISPATCH = "fleet.dispatch"
SPAN_EXECUTION = "fleet.execution"
SPAN_RECORDING = "fleet.recording"
PHASE_SPANS = (SPAN_QUEUE_WAIT, SPAN_DISPATCH, SPAN_EXECUTION, SPAN_RECORDING)
EVENT_RECEIVED = "fleet.received"

ATTR_TASK_ID = "fleet.task_id"
ATTR_POOL = "fleet.pool"
ATTR_OUTCOME = "fleet.outcome"
ATTR_REASON = "fleet.reason"
ATTR_DELIVERIES = "fleet.deliveries"

# The sampled bit is the low bit of the flags byte, the traceparent's last two hex
# digits: it is set exactly when the last digit is odd.
_SAMPLED_LAST_DIGITS = frozenset("13579bdf")
_NS_PER_S = 1_000_000_000

_setup_lock = threading.Lock()
_setup_done: set[str] = set()


class TaskTimes(NamedTuple):
    """When a task passed each point on its way, in wall-clock unix seconds.

    ``submitted``: accepted by the fleet; ``sent``: the dispatcher sent its batch to a
    host; ``received``: the host got the batch; ``started``: an agent began it (None: no
    agent did, e.g. it failed waiting: its dispatch then lasts until ``finished``);
    ``finished``: the agent was done (or the task failed); ``recorded``: its outcome was
    durable in the ledger.
    """

    submitted: float
    sent: float
    received: float
    started: float | None
    finished: float
    recorded: float


def setup_tracing(spec: TracingSpec) -> None:
    """Call ``spec.setup`` (``module:function``, no arguments), once per process.

    The hook installs the process's OpenTelemetry ``TracerProvider`` and exporter. Call
    this before making a ``TaskTracer``; calling it again with the same hook does
    nothing. Raises ImportError naming the hook when it cannot be imported.
    """
    hook = spec.setup
    if hook is None:
        return
    with _setup_lock:
        if hook in _setup_done:
            return
        import_object(hook)()
        _setup_done.add(hook)


def _is_real(provider: Any) -> bool:
    return not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider))


class TaskTracer:
    """Decides which tasks are traced and makes their spans.

    ``sample_ratio``: the share of tasks without a ``traceparent`` traced (as traces of
    their own); a task with one is traced when its parent is sampled. ``provider``: the
    ``TracerProvider`` to use (default: the process's global one, read once, here; make
    the tracer after ``setup_tracing``). When it is OpenTelemetry's default proxy or a
    no-op provider, no task is traced.

    Per task: call ``wants(item)`` when the host takes it (cheap; draws from ``rng``
    when the task has no ``traceparent``), and for the items it said yes to, ``emit``
    once the outcome is recorded.
    """

    def __init__(
        self,
        sample_ratio: float,
        rng: random.Random | None = None,
        provider: trace.TracerProvider | None = None,
    ):
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], got {sample_ratio}")
        self.sample_ratio = sample_ratio
        self._random = (rng or random.Random()).random
        if provider is None:
            provider = trace.get_tracer_provider()
        # None: tracing is off, and ``wants`` stops at this attribute.
        self._tracer: trace.Tracer | None = (
            provider.get_tracer(TRACER_NAME) if _is_real(provider) else None
        )
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_spec(cls, spec: TracingSpec, rng: random.Random | None = None) -> TaskTracer:
        """Run the spec's setup hook (once per process), then a tracer on the global
        provider with the spec's sample ratio."""
        setup_tracing(spec)
        return cls(spec.sample_ratio, rng)

    @property
    def enabled(self) -> bool:
        """Whether a real tracer provider is in use (else ``wants`` is always False)."""
        return self._tracer is not None

    def wants(self, item: Item) -> bool:
        """Whether ``item`` is traced: its parent's sampled flag when it has a
        ``traceparent``, else a draw against ``sample_ratio``. Decide once per task."""
        if self._tracer is None:
            return False
        tp = item.traceparent
        if tp is not None:
            return tp[-1] in _SAMPLED_LAST_DIGITS
        return self._random() < self.sample_ratio

    def emit(
        self,
        item: Item,
        times: TaskTimes,
        pool: str | None,
        outcome: str,
        reason: str | None = None,
    ) -> None:
        """Make the task's spans (see the module docstring) with ``times``'s
        timestamps; ``outcome`` is ``"completed"`` or ``"failed"``, ``reason`` the
        failure reason. Never raises: a broken exporter must not fail a task."""
        if self._tracer is None:
            return
        try:
            self._emit(self._tracer, item, times, pool, outcome, reason)
        except Exception:  # tracing is best effort, by contract
            log.warning("could not emit the spans of task %s", item.id, exc_info=True)

    def _emit(
        self,
        tracer: trace.Tracer,
        item: Item,
        times: TaskTimes,
        pool: str | None,
        outcome: str,
        reason: str | None,
    ) -> None:
        parent = (
            self._propagator.extract({"traceparent": item.traceparent})
            if item.traceparent is not None
            else None
        )
        attrs: dict[str, str | int] = {
            ATTR_TASK_ID: item.id,
            ATTR_OUTCOME: outcome,
            ATTR_DELIVERIES: item.deliveries,
        }
        if pool is not None:
            attrs[ATTR_POOL] = pool
        if reason is not None:
            attrs[ATTR_REASON] = reason
        failed = outcome == TaskStatus.FAILED.value
        submitted, sent, received, started, finished, recorded = _ordered_ns(times)

        task = tracer.start_span(
            SPAN_TASK, context=parent, attributes=attrs, start_time=submitted
        )
        under_task = trace.set_span_in_context(task)
        phases = (
            (SPAN_QUEUE_WAIT, submitted, sent),
            (SPAN_DISPATCH, sent, started),
            (SPAN_EXECUTION, started, finished),
            (SPAN_RECORDING, finished, recorded),
        )
        for name, start, end in phases:
            span = tracer.start_span(
                name, context=under_task, attributes=attrs, start_time=start
            )
            if name == SPAN_DISPATCH:
                span.add_event(EVENT_RECEIVED, timestamp=received)
            elif name == SPAN_EXECUTION and failed:
                span.set_status(Status(StatusCode.ERROR, reason))
            span.end(end_time=end)
        if failed:
            task.set_status(Status(StatusCode.ERROR, reason))
        task.end(end_time=recorded)


def _ordered_ns(times: TaskTimes) -> tuple[int, int, int, int, int, int]:
    """The times in nanoseconds, each at least the one before, so that clock skew
    between the dispatcher's and the host's machines cannot make a span end before it
    starts. A task no agent started gets a zero-length execution at ``finished``."""
    started = times.finished if times.started is None else times.started
    out: list[int] = []
    last = 0
    for t in (
        times.submitted,
        times.sent,
        times.received,
        started,
        times.finished,
        times.recorded,
    ):
        last = max(last, int(t * _NS_PER_S))
        out.append(last)
    return tuple(out)  # type: ignore[return-value]
