"""A host's metrics (``HostMetrics``) recorded into a ``MemorySink``: tasks by outcome,
reason and a bounded tenant label, tokens and cost, the latency, queue-wait, execution
and dispatch histograms, retries and breaker transitions; and an in-process
``AgentHost`` whose counted outcomes are exactly what it recorded in the ledger."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping

import orjson
import pytest

from fleet.observability.metrics import (
    LATENCY_BUCKETS_S,
    MemorySink,
    TenantLabels,
    for_fleet,
)
from fleet.runtime.host import AgentHost
from fleet.runtime.host_metrics import HostMetrics
from fleet.task import Item, Outcome, scoped_id, to_item
from tests.utils import FakeLedger, pool

T0 = 1_700_000_000.0
FLEET = "f1"  # the fleet the HostMetrics of these tests label everything with


class CallSink(MemorySink):
    """A MemorySink that also keeps each ``inc`` call (name, tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.incs: list[tuple[str, dict[str, str]]] = []

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.incs.append((name, dict(tags)))
        super().inc(name, value, tags)


def outcome(
    task_id: str,
    ok: bool = True,
    reason: str | None = None,
    started: float | None = T0 + 1,
    tokens: tuple[int, int, float] = (0, 0, 0.0),
) -> Outcome:
    return Outcome(
        task_id,
        ok,
        b"{}" if ok else None,
        reason,
        None if ok else "boom",
        "work/h/0",
        "work",
        1,
        T0,
        started,
        T0 + 2,
        *tokens,
    )


def _item(task_id: str, submitted: float = T0, **payload: object) -> Item:
    return Item(task_id, "work", 5, orjson.dumps(payload), submitted)


class FlushingHostMetrics(HostMetrics):
    """Flushes after each batch event, as a host's tick would between two of them."""

    def recorded(self, outcomes, recorded_unix_s):  # type: ignore[no-untyped-def]
        super().recorded(outcomes, recorded_unix_s)
        self.flush()

    def batch_arrived(self, items, sent_unix_s, now_unix_s):  # type: ignore[no-untyped-def]
        super().batch_arrived(items, sent_unix_s, now_unix_s)
        self.flush()


def _metrics(*tenants: str) -> tuple[HostMetrics, CallSink]:
    sink = CallSink()
    return FlushingHostMetrics("work", TenantLabels(tenants), sink, fleet=FLEET), sink


def _fleets(sink: MemorySink) -> set[str]:
    """The fleet label's values over every series the sink holds."""
    keys = (*sink.counters, *sink.gauges, *sink.histograms)
    return {dict(tags)["fleet"] for _, tags in keys}


def _obs(sink: MemorySink, name: str, **tags: str) -> tuple[int, float]:
    """(count, sum) of one histogram series (of fleet ``FLEET``)."""
    key = (name, tuple(sorted({"fleet": FLEET, **tags}.items())))
    cumulative, total = sink.histograms[key]
    return cumulative[-1], total


def _tasks(sink: MemorySink) -> dict[tuple[str, str, str], float]:
    out = {}
    for (name, tags), v in sink.counters.items():
        if name == "fleet_tasks_total":
            t = dict(tags)
            assert t["pool"] == "work" and t["fleet"] == FLEET
            out[(t["outcome"], t["reason"], t["tenant"])] = v
    return out


def test_recorded_counts_tasks_by_outcome_reason_and_tenant():
    hm, sink = _metrics("acme")
    hm.recorded(
        [
            outcome("@acme:x"),
            outcome("@acme:y"),
            outcome("@zeta:x"),  # a tenant without a label of its own
            outcome("plain"),  # no tenant
            outcome("@acme:t", ok=False, reason="timeout"),
            outcome("odd", ok=False, reason="an agent's own word"),  # not in the vocabulary
        ],
        T0 + 3,
    )
    assert _tasks(sink) == {
        ("completed", "ok", "acme"): 2,
        ("completed", "ok", "other"): 1,
        ("completed", "ok", "none"): 1,
        ("failed", "timeout", "acme"): 1,
        ("failed", "other", "none"): 1,
    }
    # One inc per label set, not per task.
    assert [n for n, _ in sink.incs] == ["fleet_tasks_total"] * 5


def test_a_scoped_tenant_without_its_own_label_is_other():
    hm, sink = _metrics()  # no configured tenants
    hm.recorded([outcome("@acme:x"), outcome("plain")], T0 + 3)
    assert _tasks(sink) == {("completed", "ok", "other"): 1, ("completed", "ok", "none"): 1}


def test_tokens_and_cost_per_tenant_only_for_tasks_that_used_any():
    hm, sink = _metrics("acme")
    hm.recorded(
        [
            outcome("@acme:a", tokens=(100, 50, 0.25)),
            outcome("@acme:b", tokens=(10, 5, 0.5)),
            outcome("plain", tokens=(1, 2, 0.125)),
            outcome("@zeta:c"),  # no tokens: no series for "other"
        ],
        T0 + 3,
    )
    c = sink.counters

    def tokens(tenant: str, direction: str) -> float:
        return c[
            (
                "fleet_tokens_total",
                (
                    ("direction", direction),
                    ("fleet", FLEET),
                    ("pool", "work"),
                    ("tenant", tenant),
                ),
            )
        ]

    assert tokens("acme", "input") == 110 and tokens("acme", "output") == 55
    assert tokens("none", "input") == 1 and tokens("none", "output") == 2
    cost = {dict(t)["tenant"]: v for (n, t), v in c.items() if n == "fleet_cost_usd_total"}
    assert cost == {"acme": pytest.approx(0.75), "none": pytest.approx(0.125)}
    assert sink.total("fleet_tokens_total", tenant="other") == 0
    assert Counter(n for n, _ in sink.incs) == {
        "fleet_tasks_total": 3,  # acme, none, other
        "fleet_tokens_total": 4,  # (acme, none) x (input, output)
        "fleet_cost_usd_total": 2,
    }
    assert _fleets(sink) == {FLEET}


def test_one_latency_observation_per_outcome_and_execution_only_for_started_tasks():
    hm, sink = _metrics()
    hm.recorded(
        [
            outcome("a"),
            outcome("b", ok=False, reason="error"),
            # Never ran: its deadline passed while it waited for an agent.
            outcome("c", ok=False, reason="deadline_exceeded", started=None),
        ],
        T0 + 3,
    )
    done, failed = {"outcome": "completed"}, {"outcome": "failed"}
    assert _obs(sink, "fleet_task_latency_seconds", pool="work", **done) == (1, 3.0)
    assert _obs(sink, "fleet_task_latency_seconds", pool="work", **failed) == (2, 6.0)
    assert _obs(sink, "fleet_task_execution_seconds", pool="work", **done) == (1, 1.0)
    # b only
    assert _obs(sink, "fleet_task_execution_seconds", pool="work", **failed) == (1, 1.0)
    assert sink.total("fleet_task_latency_seconds") == 3
    assert sink.total("fleet_task_execution_seconds") == 2
    assert sink.total("fleet_task_latency_seconds", fleet=FLEET) == 3
    assert _fleets(sink) == {FLEET}


def test_a_hundred_successes_of_one_tenant_are_one_counter_call():
    hm, sink = _metrics("acme")
    hm.recorded([outcome(f"@acme:{i}") for i in range(100)], T0 + 3)
    assert sink.incs == [
        (
            "fleet_tasks_total",
            {
                "fleet": FLEET,
                "pool": "work",
                "outcome": "completed",
                "reason": "ok",
                "tenant": "acme",
            },
        )
    ]
    assert sink.counters == {
        (
            "fleet_tasks_total",
            (
                ("fleet", FLEET),
                ("outcome", "completed"),
                ("pool", "work"),
                ("reason", "ok"),
                ("tenant", "acme"),
            ),
        ): 100
    }
    # Plus the latency and execution histograms: one call each, not one per task.
    assert sink.calls == 1 + 1 + 1


def test_payload_tenants_label_configured_tenants_and_stay_bounded():
    hm, sink = _metrics("t1")
    items = [_item(f"p{i}", tenant=f"t{i}") for i in range(10_000)]
    items += [_item("bare"), _item("@t1:scoped", tenant="t5")]  # the scope wins
    hm.batch_arrived(items, T0 + 1, T0 + 1.5)
    hm.recorded([outcome(it.id) for it in items], T0 + 3)
    tenants = {dict(t)["tenant"] for n, t in sink.counters if n == "fleet_tasks_total"}
    assert tenants == {"t1", "other", "none"}  # at most known + 2 values
    got = _tasks(sink)
    assert got[("completed", "ok", "t1")] == 2  # p1 and the scoped one
    assert got[("completed", "ok", "other")] == 9_999
    assert got[("completed", "ok", "none")] == 1
    # Their payload tenants are forgotten once recorded: the same id again has none.
    sink2 = CallSink()
    hm.agg.sink = for_fleet(sink2, FLEET)
    hm.recorded([outcome("p1")], T0 + 4)
    assert _tasks(sink2) == {("completed", "ok", "none"): 1}


def test_forget_drops_the_payload_tenant_of_a_task_handed_back():
    hm, sink = _metrics("acme")
    hm.batch_arrived([_item("a", tenant="acme")], None, T0 + 1)
    hm.forget(["a"])
    hm.recorded([outcome("a")], T0 + 3)
    assert _tasks(sink) == {("completed", "ok", "none"): 1}


def test_batch_arrived_observes_queue_wait_per_item_and_dispatch_once_per_batch():
    hm, sink = _metrics()
    items = [_item("a", T0), _item("b", T0 + 1), _item("c", T0 + 5)]  # c: after "sent"
    hm.batch_arrived(items, T0 + 4, T0 + 4.25)
    assert _obs(sink, "fleet_task_queue_wait_seconds", pool="work") == (3, 7.0)
    assert _obs(sink, "fleet_dispatch_overhead_seconds", pool="work") == (1, 0.25)
    # Buckets are cumulative and inclusive: 0.25 s counts in le=0.25, and above.
    key = ("fleet_dispatch_overhead_seconds", (("fleet", FLEET), ("pool", "work")))
    cumulative, _ = sink.histograms[key]
    i = LATENCY_BUCKETS_S.index(0.25)
    assert cumulative[i - 1] == 0 and cumulative[i:] == [1] * (len(cumulative) - i)
    # Without a send time: the arrival stands in for it, and no dispatch observation.
    hm.batch_arrived([_item("d", T0 + 8)], None, T0 + 10)
    assert _obs(sink, "fleet_task_queue_wait_seconds", pool="work") == (4, 9.0)
    assert sink.total("fleet_task_queue_wait_seconds") == 4
    assert sink.total("fleet_dispatch_overhead_seconds") == 1
    calls = sink.calls
    hm.batch_arrived([], T0, T0)
    assert sink.calls == calls and not sink.counters
    assert _fleets(sink) == {FLEET}


def test_retries_are_counted_by_reason_on_flush():
    hm, sink = _metrics()
    hm.retried("timeout")
    hm.retried("timeout")
    hm.retried("something new")
    assert sink.counters == {}  # held until the flush
    hm.flush()
    retries = {
        dict(t)["reason"]: v
        for (n, t), v in sink.counters.items()
        if n.endswith("retries_total")
    }
    assert retries == {"timeout": 2, "other": 1}
    assert len(sink.incs) == 2
    hm.flush()  # nothing new: no calls
    assert len(sink.incs) == 2
    hm.retried("error")
    hm.recorded([outcome("x")], T0 + 3)  # recording flushes too
    assert sink.total("fleet_task_retries_total", reason="error") == 1
    assert sink.total("fleet_task_retries_total") == 4


def test_breaker_counts_count_only_the_growth_of_transitions():
    hm, sink = _metrics()
    hm.flush({"transition:open": 2, "transition:closed": 1, "calls": 50})
    hm.flush({"transition:open": 3, "transition:closed": 1, "calls": 80})
    hm.flush({"transition:open": 3, "transition:half_open": 2, "rejected": 9})

    def state(s: str) -> float:
        return sink.total("fleet_breaker_transitions_total", pool="work", state=s)

    assert (state("open"), state("closed"), state("half_open")) == (3, 1, 2)
    assert {n for n, _ in sink.incs} == {"fleet_breaker_transitions_total"}
    # open +2, closed +1, open +1, half_open +2: one call per growth.
    assert len(sink.incs) == 4


# --- an AgentHost recording into a MemorySink -----------------------------------------


def _host(sink: MemorySink) -> tuple[AgentHost, FakeLedger]:
    spec = pool(
        "work",
        agent_class="fleet.agents.testing:SleepAgent",
        agents_per_host=4,
        agent_kwargs={"delay_s": 0.0},
        autoscaling={"min_agents": 4, "max_agents": 4},
    )
    host = AgentHost(
        spec,
        {"retry": {"max_attempts": 1}},
        max_output_bytes=1_000,
        metric_tenants=["acme"],
        metrics_sink=sink,
    )
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


def test_a_hosts_task_counts_are_the_outcomes_it_recorded():
    sink = MemorySink()
    host, ledger = _host(sink)

    def task(payload: dict) -> Item:
        return to_item({"capability": "work", "payload": payload}, {"work"})

    items = [task({"i": i}) for i in range(20)]
    items += [task({"i": 100 + i, "fail": "x"}) for i in range(5)]  # error
    items += [task({"text": "x" * 5_000})]  # output_too_large
    items += [task({"i": 200 + i})._replace(id=scoped_id("acme", f"a{i}")) for i in range(3)]
    report = asyncio.run(host.run_and_record(items, sent_unix_s=time.time()))
    assert report.recorded == len(items) and report.retry_ids == []
    assert sink.total("fleet_tasks_total") == 0  # counted in the host until its tick
    host.metrics.flush()
    assert len(ledger.outcomes) == len(items)

    ok = [o for o in ledger.outcomes if o.ok]
    failed = Counter(o.reason for o in ledger.outcomes if not o.ok)
    assert len(ok) == 23 and failed == {"error": 5, "output_too_large": 1}
    assert sink.total("fleet_tasks_total", outcome="completed") == len(ok)
    assert sink.total("fleet_tasks_total", outcome="failed") == sum(failed.values())
    for reason, n in failed.items():
        assert sink.total("fleet_tasks_total", outcome="failed", reason=reason) == n
    assert sink.total("fleet_tasks_total", tenant="acme") == 3
    assert sink.total("fleet_tasks_total", tenant="none") == len(items) - 3
    assert sink.total("fleet_task_latency_seconds") == len(ledger.outcomes)
    assert sink.total("fleet_task_latency_seconds", outcome="failed") == 6
    assert sink.total("fleet_task_queue_wait_seconds") == len(items)
    assert sink.total("fleet_dispatch_overhead_seconds") == 1
    assert {dict(t)["pool"] for _, t in (*sink.counters, *sink.histograms)} == {"work"}
    assert _fleets(sink) == {"fleet"}  # no ledger: the default fleet name


def test_tasks_a_queue_shard_fails_itself_are_counted_like_a_hosts():
    from fleet.policy.disciplines import overdue_outcome

    sink = MemorySink()
    now = time.time()
    items = [
        to_item({"capability": "work", "deadline_unix_s": now + 1}, {"work"}, now_unix_s=now)
        for _ in range(3)
    ]
    scoped = to_item({"capability": "work"}, {"work"}, now_unix_s=now, tenant="acme")
    outcomes = [overdue_outcome(it, now + 2) for it in items]
    outcomes.append(overdue_outcome(scoped._replace(deadline_unix_s=now + 1), now + 2))
    # What a queue shard does with the outcomes it records itself.
    counted = HostMetrics("work", TenantLabels(["acme"]), sink, fleet="work-fleet")
    counted.recorded(outcomes, now + 2)
    counted.flush()
    assert sink.total("fleet_tasks_total", reason="deadline_exceeded", tenant="none") == 3
    assert sink.total("fleet_tasks_total", reason="deadline_exceeded", tenant="acme") == 1
    assert sink.total("fleet_tasks_total", outcome="completed") == 0
    assert sink.total("fleet_task_latency_seconds", pool="work", outcome="failed") == 4
    assert sink.total("fleet_tasks_total", fleet="work-fleet") == 4
    assert _fleets(sink) == {"work-fleet"}


def test_a_metrics_failure_never_holds_a_batch():
    sink = MemorySink()
    host, ledger = _host(sink)

    def broken(*_a: object, **_k: object) -> None:
        raise TypeError("a broken metric")

    host.metrics.recorded = broken  # type: ignore[method-assign]
    items = [to_item({"capability": "work", "payload": {"i": i}}, {"work"}) for i in range(5)]
    report = asyncio.run(asyncio.wait_for(host.run_and_record(items), 30))
    assert report.recorded == 5 and len(ledger.outcomes) == 5


def test_a_batch_that_fails_to_record_forgets_its_tenants_and_trace_plans():
    class DownLedger(FakeLedger):
        async def record_shard_async(self, shard, outcomes, excused=None):  # type: ignore[no-untyped-def]
            raise ConnectionError("ledger down")

    host, _ = _host(MemorySink())
    host.recorder.client = DownLedger()
    items = [
        to_item({"capability": "work", "payload": {"tenant": "acme", "i": i}}, {"work"})
        for i in range(5)
    ]
    for it in items:  # as a sampled task's arrival would
        host.recorder.note_traced(it, 0.0, 0.0)
    with pytest.raises(ConnectionError):
        asyncio.run(asyncio.wait_for(host.run_and_record(items), 30))
    assert host.metrics._payload_tenant == {} and host.recorder.traced == {}
