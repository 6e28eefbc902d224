"""Task traces: the ``traceparent`` a task carries, and the spans ``TaskTracer`` makes."""

from __future__ import annotations

import random
import sqlite3

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, StatusCode

from fleet.observability import tracing
from fleet.observability.tracing import (
    PHASE_SPANS,
    SPAN_TASK,
    TaskTimes,
    TaskTracer,
    setup_tracing,
)
from fleet.queue.lease_queue import LeaseQueue
from fleet.queue.storage import MemoryStorage, SqliteStorage
from fleet.spec.observability import TracingSpec
from fleet.task import Item, Task, TaskRejected, item_to_task, to_item

T0 = 1_700_000_000.0
CAPS = frozenset({"work"})


def traceparent(k: int, sampled: bool = True) -> str:
    """The submitter's span ``k``: trace id ``k + 1``, span id ``k + 1000``."""
    return f"00-{k + 1:032x}-{k + 1000:016x}-{'01' if sampled else '00'}"


def make_item(k: int, tp: str | None = None, deliveries: int = 1) -> Item:
    return Item(f"t{k}", "work", 5, b"{}", T0 + k, deliveries=deliveries, traceparent=tp)


def times(k: int) -> TaskTimes:
    s = T0 + k
    return TaskTimes(s, s + 1.0, s + 1.25, s + 1.5, s + 3.0, s + 3.125)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter) -> TracerProvider:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p


def by_trace(spans: tuple[ReadableSpan, ...]) -> dict[int, list[ReadableSpan]]:
    out: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        assert s.context is not None
        out.setdefault(s.context.trace_id, []).append(s)
    return out


# -- the traceparent a task carries ---------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version 01
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",  # not hex
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
        "",
    ],
)
def test_a_malformed_traceparent_is_refused_naming_the_field(bad):
    with pytest.raises(TaskRejected) as err:
        to_item({"capability": "work", "traceparent": bad}, CAPS)
    assert err.value.field == "traceparent"


@pytest.mark.parametrize(
    "bad",
    [
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    ],
)
def test_an_all_zero_trace_or_span_id_is_refused_naming_the_field(bad):
    with pytest.raises(TaskRejected, match="all zeros") as err:
        to_item({"id": "x", "capability": "work", "traceparent": bad}, CAPS)
    assert (err.value.field, err.value.task_id) == ("traceparent", "x")
    with pytest.raises(TaskRejected) as err:
        to_item(Task(capability="work", traceparent=bad), CAPS)
    assert err.value.field == "traceparent"


def test_the_traceparent_goes_from_task_to_item_and_back():
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    it = to_item({"capability": "work", "traceparent": tp}, CAPS)
    assert it.traceparent == tp and it._fields.index("traceparent") == 9
    assert item_to_task(it).traceparent == tp
    assert to_item({"capability": "work"}, CAPS).traceparent is None
    # positional constructions that stop at ``deliveries`` still work
    assert Item("a", "work", 5, b"{}", T0, None, None, None, 3).traceparent is None


def test_the_task_schema_documents_the_traceparent_format():
    prop = Task.model_json_schema()["properties"]["traceparent"]
    assert any(b.get("pattern", "").startswith("^00-[0-9a-f]{32}") for b in prop["anyOf"])


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_the_traceparent_survives_queue_storage_and_redelivery(backend, tmp_path):
    tp = traceparent(7)

    def open_store():
        return shared if backend == "memory" else SqliteStorage(tmp_path / "s.sqlite3")

    shared = MemoryStorage()
    store = open_store()
    q = LeaseQueue(10, storage=store)
    q.put([make_item(0, tp, deliveries=0), make_item(1, None, deliveries=0)])
    got = {it.id: it for it in q.lease(2, "h", 5.0, now=0.0)}
    assert got["t0"].traceparent == tp and got["t0"].deliveries == 1
    assert got["t1"].traceparent is None
    q.close() if backend == "sqlite" else q.flush()

    restarted = LeaseQueue(10, storage=open_store())
    assert restarted.adopt(["t0"], "h", 5.0, now=6.0, deliveries=[4]) == 1
    assert restarted._pending["t0"] == make_item(0, tp, deliveries=4)
    again = {it.id: it for it in restarted.lease(2, "h", 5.0, now=6.0)}
    assert again["t1"].traceparent is None and again["t1"].deliveries >= 1


def test_a_queue_file_made_before_traceparents_still_loads(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE items (seq INTEGER PRIMARY KEY, id TEXT NOT NULL,"
        " capability TEXT NOT NULL, priority INTEGER NOT NULL, payload BLOB NOT NULL,"
        " submitted_unix_s REAL NOT NULL, deadline_unix_s REAL, utility REAL,"
        " affinity_key TEXT, deliveries INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO items VALUES (1, 'old', 'work', 5, x'7b7d', ?, NULL, NULL, 'k', 2)",
        (T0,),
    )
    db.commit()
    db.close()
    store = SqliteStorage(path)
    assert list(store.load()) == [Item("old", "work", 5, b"{}", T0, None, None, "k", 2)]
    store.append([make_item(1, traceparent(1))])
    store.close()
    assert [it.traceparent for it in SqliteStorage(path).load()] == [None, traceparent(1)]


# -- sampling ------------------------------------------------------------------------


def test_without_an_sdk_provider_nothing_is_traced(monkeypatch):
    monkeypatch.setattr(trace, "get_tracer_provider", ProxyTracerProvider)
    tracer = TaskTracer(1.0)
    assert not tracer.enabled
    assert not tracer.wants(make_item(0, traceparent(0)))
    assert not tracer.wants(make_item(1))
    assert not TaskTracer(1.0, provider=NoOpTracerProvider()).enabled


def test_the_global_provider_is_used_when_it_is_a_real_one(monkeypatch, provider, exporter):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    tracer = TaskTracer(1.0)
    assert tracer.enabled and tracer.wants(make_item(0))
    tracer.emit(make_item(0), times(0), "p", "completed")
    assert len(exporter.get_finished_spans()) == 5


def test_a_traceparent_decides_by_its_sampled_flag_whatever_the_ratio(provider):
    never = TaskTracer(0.0, provider=provider)
    always = TaskTracer(1.0, provider=provider)
    for tracer in (never, always):
        assert tracer.wants(make_item(0, traceparent(0, sampled=True)))
        assert not tracer.wants(make_item(0, traceparent(0, sampled=False)))
        # other flag bits set: only the low (sampled) bit counts
        assert tracer.wants(make_item(0, traceparent(0)[:-2] + "03"))
        assert not tracer.wants(make_item(0, traceparent(0)[:-2] + "02"))


def test_tasks_without_a_traceparent_are_sampled_at_the_ratio(provider):
    assert not any(TaskTracer(0.0, provider=provider).wants(make_item(k)) for k in range(200))
    assert all(TaskTracer(1.0, provider=provider).wants(make_item(k)) for k in range(200))
    tracer = TaskTracer(0.25, rng=random.Random(7), provider=provider)
    share = sum(tracer.wants(make_item(k)) for k in range(4000)) / 4000
    assert 0.22 < share < 0.28


def test_a_sample_ratio_outside_0_1_is_refused(provider):
    with pytest.raises(ValueError, match="sample_ratio"):
        TaskTracer(1.5, provider=provider)


# -- spans -----------------------------------------------------------------------------


def test_each_task_is_one_trace_of_four_phases_under_the_submitters_span(provider, exporter):
    n = 5
    tracer = TaskTracer(0.0, provider=provider)
    items = [make_item(k, traceparent(k), deliveries=k + 1) for k in range(n)]
    for k, it in enumerate(items):
        assert tracer.wants(it)
        tracer.emit(it, times(k), "pool-a", "completed")

    traces = by_trace(exporter.get_finished_spans())
    assert sorted(traces) == [k + 1 for k in range(n)]  # the submitters' trace ids
    for k in range(n):
        spans = {s.name: s for s in traces[k + 1]}
        assert sorted(spans) == sorted([SPAN_TASK, *PHASE_SPANS])
        task = spans[SPAN_TASK]
        # fleet.task is a child of the submitter's span; the four phases, of fleet.task
        assert task.parent is not None and task.parent.span_id == k + 1000
        assert task.parent.is_remote
        for name in PHASE_SPANS:
            assert spans[name].parent is not None
            assert spans[name].parent.span_id == task.context.span_id
            assert dict(spans[name].attributes or {}) == {
                "fleet.task_id": f"t{k}",
                "fleet.pool": "pool-a",
                "fleet.outcome": "completed",
                "fleet.deliveries": k + 1,
            }
        # the phases tile submitted -> recorded, in order, at the times given (ns)
        t = times(k)
        expected = [
            (t.submitted, t.sent),
            (t.sent, t.started),
            (t.started, t.finished),
            (t.finished, t.recorded),
        ]
        got = [(spans[name].start_time, spans[name].end_time) for name in PHASE_SPANS]
        assert got == [(int(a * 1e9), int(b * 1e9)) for a, b in expected]
        assert (task.start_time, task.end_time) == (got[0][0], got[-1][1])
        (received,) = spans["fleet.dispatch"].events
        assert received.name == "fleet.received" and received.timestamp == int(
            t.received * 1e9
        )
        assert task.status.status_code is StatusCode.UNSET


def test_an_unsampled_parent_gives_no_spans(provider, exporter):
    tracer = TaskTracer(1.0, provider=provider)
    it = make_item(0, traceparent(0, sampled=False))
    assert not tracer.wants(it)
    # even emitted regardless, the SDK's parent-based sampler records nothing
    tracer.emit(it, times(0), "p", "completed")
    assert exporter.get_finished_spans() == ()


def test_without_a_traceparent_ratio_1_makes_new_root_traces_and_0_none(provider, exporter):
    items = [make_item(k) for k in range(3)]
    off = TaskTracer(0.0, provider=provider)
    assert [it for it in items if off.wants(it)] == []

    on = TaskTracer(1.0, provider=provider)
    for k, it in enumerate(items):
        if on.wants(it):
            on.emit(it, times(k), None, "completed")
    traces = by_trace(exporter.get_finished_spans())
    assert len(traces) == 3
    for spans in traces.values():
        (root,) = [s for s in spans if s.parent is None]
        assert root.name == SPAN_TASK and len(spans) == 5
        assert "fleet.pool" not in (root.attributes or {})


def test_a_failed_task_marks_its_spans_with_the_reason(provider, exporter):
    tracer = TaskTracer(1.0, provider=provider)
    never_started = times(0)._replace(started=None)
    tracer.emit(make_item(0, traceparent(0)), never_started, "p", "failed", "timeout")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in (SPAN_TASK, "fleet.execution"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert spans[name].status.description == "timeout"
    assert spans["fleet.queue_wait"].attributes["fleet.reason"] == "timeout"
    # no agent started it: dispatch lasts until it failed, execution takes no time
    execution = spans["fleet.execution"]
    assert execution.start_time == execution.end_time == int(never_started.finished * 1e9)


def test_times_out_of_order_across_machines_still_make_well_formed_spans(provider, exporter):
    skewed = TaskTimes(T0, T0 + 2.0, T0 + 1.0, T0 + 1.5, T0 + 3.0, T0 + 3.5)  # host behind
    TaskTracer(1.0, provider=provider).emit(make_item(0), skewed, "p", "completed")
    for s in exporter.get_finished_spans():
        assert s.start_time is not None and s.end_time is not None
        assert s.start_time <= s.end_time


class _FailingExporter(SpanExporter):
    def export(self, spans):
        raise RuntimeError("collector down")


class _BrokenProvider(trace.TracerProvider):
    def get_tracer(self, *args, **kwargs):
        return _BrokenTracer()


class _BrokenTracer(trace.NoOpTracer):
    def start_span(self, *args, **kwargs):
        raise RuntimeError("broken tracer")


def test_emit_never_raises_into_the_caller(caplog):
    broken = TaskTracer(1.0, provider=_BrokenProvider())
    assert broken.enabled
    broken.emit(make_item(0), times(0), "p", "completed")
    assert "could not emit the spans of task t0" in caplog.text

    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(_FailingExporter()))
    TaskTracer(1.0, provider=p).emit(make_item(1), times(1), "p", "completed")


# -- setup ----------------------------------------------------------------------------

SETUP_CALLS: list[int] = []


def count_setup() -> None:
    SETUP_CALLS.append(1)


def test_setup_calls_the_hook_once_per_process(monkeypatch):
    monkeypatch.setattr(tracing, "_setup_done", set())
    SETUP_CALLS.clear()
    spec = TracingSpec(setup="tests.observability.test_tracing:count_setup")
    setup_tracing(spec)
    setup_tracing(spec)
    TaskTracer.from_spec(spec)
    assert SETUP_CALLS == [1]
    setup_tracing(TracingSpec())  # no hook: nothing to do
    with pytest.raises(ImportError, match="no_such_hook"):
        setup_tracing(TracingSpec(setup="tests.observability.test_tracing:no_such_hook"))
