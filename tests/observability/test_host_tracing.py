"""A host traces its sampled tasks: with an in-memory OpenTelemetry exporter, one trace
per task, under the submitter's ``traceparent``, with the queue-wait, dispatch,
execution and recording spans in time order, made once the outcome is recorded; a task
whose submitter did not sample it makes none. In process, with a fake ledger."""

from __future__ import annotations

import asyncio
import itertools
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fleet.observability.tracing import PHASE_SPANS, SPAN_TASK, TaskTracer
from fleet.runtime.host import AgentHost
from fleet.task import to_item
from tests.utils import FakeLedger, pool

N = 12


def _traceparent(i: int, sampled: bool) -> str:
    return f"00-{i + 1:032x}-{i + 1:016x}-{'01' if sampled else '00'}"


def test_each_sampled_task_is_one_trace_of_four_spans_under_its_submitter():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    host = AgentHost(
        pool(
            "work",
            agent_class="fleet.agents.testing:SleepAgent",
            agents_per_host=4,
            agent_kwargs={"delay_s": 0.002},
            autoscaling={"min_agents": 4, "max_agents": 4},
        ),
        {"retry": {"max_attempts": 1}},
        observability={"tracing": {"sample_ratio": 0.0}},
    )
    host.tracer = host.recorder.tracer = TaskTracer(0.0, provider=provider)
    ledger = FakeLedger()
    host.recorder.client = ledger
    items = [
        to_item(
            {"capability": "work", "payload": {"i": i}, "traceparent": _traceparent(i, i < N)},
            {"work"},
        )
        for i in range(N + 3)  # the last 3: not sampled by their submitter
    ]
    sent = time.time()
    report = asyncio.run(host.run_and_record(items, sent_unix_s=sent))
    assert report.recorded == N + 3

    spans = exporter.get_finished_spans()
    by_trace: dict[int, list] = {}
    for s in spans:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    assert sorted(by_trace) == [i + 1 for i in range(N)]  # one trace per sampled task
    for trace_id, group in by_trace.items():
        names = sorted(s.name for s in group)
        assert names == sorted((SPAN_TASK, *PHASE_SPANS))
        task = next(s for s in group if s.name == SPAN_TASK)
        # Under the submitter's span (its span id is the trace id here).
        assert task.parent is not None and task.parent.span_id == trace_id
        assert task.attributes["fleet.task_id"] == items[trace_id - 1].id
        phases = {s.name: s for s in group if s.name != SPAN_TASK}
        assert all(s.parent.span_id == task.context.span_id for s in phases.values())
        ordered = [phases[n] for n in PHASE_SPANS]
        assert ordered[0].start_time == task.start_time  # submitted
        assert ordered[0].end_time == int(sent * 1e9)  # queue wait ends at dispatch
        for a, b in itertools.pairwise(ordered):
            assert a.end_time == b.start_time
        assert ordered[-1].end_time == task.end_time
        recorded_at = ledger.recorded_at[items[trace_id - 1].id]
        assert task.end_time >= int(recorded_at * 1e9)  # once durable, not before
        execution = phases["fleet.execution"]
        assert execution.end_time - execution.start_time >= 1_000_000  # the agent's 2 ms
