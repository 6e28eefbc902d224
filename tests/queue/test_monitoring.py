"""Monitoring: shard and queue health, alert rules that fire and clear (the metrics the
controller exports from them: tests/observability/test_control_metrics.py)."""

from __future__ import annotations

import pytest

from fleet.policy.queue_alerts import AlertEvaluator, AlertKind, Observations
from fleet.queue._ages import SubmitTimeHistogram
from fleet.queue.lease_queue import LeaseQueue
from fleet.queue.monitor import QueueMonitor
from fleet.spec import SpecError, parse_spec
from fleet.spec.queues import QueueAlertRule, QueueSpec
from tests.queue.helpers import item
from tests.utils import FakeClock, pool

T0 = 1_700_000_000.0


def test_alert_fires_when_a_queue_crosses_its_depth_threshold_and_clears_when_it_drains():
    """Acceptance 5, end to end: real queues, the monitor, the spec's rule."""
    spec = QueueSpec(alerts=["depth > 10,000"], shards=2)
    clock = FakeClock(T0)
    shards = [LeaseQueue(spec.max_depth) for _ in range(spec.shards)]
    monitor = QueueMonitor()
    alerts = AlertEvaluator(spec.alerts)
    seen = []

    def tick():
        clock.advance(1.0)
        for k, q in enumerate(shards):
            monitor.observe("support", k, q.stats(clock()), clock())
        seen.extend(alerts.evaluate(monitor.observations(clock()), clock()))

    n = 0
    for _ in range(12):  # 1,000 items a second into the two shards
        for q in shards:
            q.put([item(f"{n + j}", clock()) for j in range(500)])
            n += 500
        tick()
    assert [(e.kind, e.subject) for e in seen] == [(AlertKind.FIRED, "support")]
    assert "depth = 11000 > 10000" in seen[0].message
    assert [a.rule for a in alerts.active()] == ["depth > 10000"]
    while sum(q.depth for q in shards) > 9_000:
        for q in shards:
            q.ack([i.id for i in q.lease(250, "h", 30, clock())])
        tick()
    assert seen[-1].kind is AlertKind.CLEARED and alerts.active() == []
    assert len(seen) == 2


def _obs(**queues):
    return Observations(queues={q: {"depth": d} for q, d in queues.items()})


def test_hysteresis_and_hold_time():
    rule = QueueAlertRule(metric="depth", threshold=100, clear_threshold=80, for_s=5)
    ev = AlertEvaluator([rule])
    assert ev.evaluate(_obs(a=150), 0) == []  # pending, not yet held 5 s
    assert ev.evaluate(_obs(a=50), 3) == []  # dipped: the hold restarts
    assert ev.evaluate(_obs(a=150), 4) == []
    [fired] = ev.evaluate(_obs(a=120), 9)
    assert fired.kind is AlertKind.FIRED and fired.subject == "a"
    assert ev.evaluate(_obs(a=90), 10) == []  # below threshold, above clear: still firing
    assert ev.active()[0].value == 90
    [cleared] = ev.evaluate(_obs(a=80), 11)
    assert cleared.kind is AlertKind.CLEARED


def test_each_subject_alerts_separately_and_vanished_subjects_clear():
    heard = []
    ev = AlertEvaluator(
        [QueueAlertRule.model_validate("depth >= 10")], listeners=[heard.append]
    )
    ev.evaluate(_obs(a=10, b=5), 0)
    ev.evaluate(_obs(a=10, b=11), 1)
    assert [(e.kind.value, e.subject) for e in heard] == [("fired", "a"), ("fired", "b")]
    ev.evaluate(_obs(b=11), 2)  # queue "a" was removed
    assert heard[-1].kind is AlertKind.CLEARED and heard[-1].subject == "a"
    assert heard[-1].value is None


def test_shard_scope_rules_watch_each_shard():
    m = QueueMonitor()
    deep, shallow = LeaseQueue(100), LeaseQueue(100)
    deep.put([item(i, T0) for i in range(30)])
    m.observe("q", 0, deep.stats(T0 + 10), 0.0)
    m.observe("q", 1, shallow.stats(T0 + 10), 0.0)
    ev = AlertEvaluator(
        [
            QueueAlertRule(metric="depth", threshold=20, scope="shard"),
            QueueAlertRule(metric="shard_max_over_mean", threshold=1.5),
        ]
    )
    events = ev.evaluate(m.observations(0.0), 0.0)
    assert sorted(e.subject for e in events) == ["q", "q/0"]


def test_monitor_rates_ages_balance_and_stale_shards():
    m = QueueMonitor(rate_window_s=1e-9, stale_after_s=30)  # tiny window: no smoothing
    q = LeaseQueue(10_000)
    q.put([item(i, T0 + i / 100) for i in range(1000)])  # submitted over 10 s
    m.observe("q", 0, q.stats(T0 + 10), 0.0)
    q.put([item(f"b{i}", T0 + 10) for i in range(500)])
    got = q.lease(200, "h", 1.0, 0.0)
    q.ack([g.id for g in got[:100]])
    q.expire(5.0)  # the other 100 leases expire: redelivered
    h = m.observe("q", 0, q.stats(T0 + 12), 2.0)
    assert h.enqueue_per_s == 250.0 and h.dequeue_per_s == 100.0
    assert h.lease_expiries_per_s == 50.0 and h.redeliveries_per_s == 50.0
    assert h.oldest_age_s == pytest.approx(11.0) and 10.5 < h.age_p99_s < 11.1
    m.observe("q", 1, LeaseQueue(10).stats(T0), 2.0)
    r = m.report(2.0)["q"]
    assert r.depth == 1400 and r.balance.max_over_mean == 2.0
    assert r.to_dict()["shards"][0]["depth"] == 1400
    # The runtime's dict form of stats is accepted too, and counters that go down mean a
    # restarted shard (its totals count as new).
    h2 = m.observe(
        "q",
        0,
        {"capability": "q", "shard": 0, **vars_of(q.stats(T0 + 13)), "enqueued_total": 10},
        3.0,
    )
    assert h2.enqueue_per_s == 10.0
    stale = m.report(32.5)["q"]  # shard 1 last seen at 2.0, shard 0 at 3.0
    assert stale.stale_shards == (1,) and [s.shard for s in stale.shards] == [0]


def vars_of(stats):
    import dataclasses

    return dataclasses.asdict(stats)


def test_age_histogram_is_bounded_and_accurate():
    h = SubmitTimeHistogram(width_s=0.001, max_buckets=64)
    ts = [T0 + i * 0.37 for i in range(10_000)]  # spans 3,700 s
    for t in ts:
        h.add(t)
    assert len(h._counts) <= 64
    now = ts[-1]
    p50, p99 = h.age_quantiles(now, (0.5, 0.99))
    err = h.width_s
    assert abs(p50 - 1850) <= err and abs(p99 - 0.99 * 3700) <= err
    for t in ts[:9_000]:
        h.remove(t)
    assert len(h) == 1000
    [p100] = h.age_quantiles(now, (1.0,))
    assert abs(p100 - (now - ts[9_000])) <= err
    for t in ts[9_000:]:
        h.remove(t)
    assert len(h) == 0 and h.width_s == 0.001  # full resolution again once empty


@pytest.mark.parametrize(
    "rule,path,needle",
    [
        ("depth >> 5", "queues.alerts.0", "not of the form"),
        ({"metric": "depht", "threshold": 1}, "queues.alerts.0.metric", "depth"),
        (
            {"metric": "depth", "threshold": 5, "clear_threshold": 9},
            "queues.alerts.0",
            "clear_threshold (9.0) must be <= threshold (5.0)",
        ),
        (
            {"metric": "shard_cv", "threshold": 1, "scope": "shard"},
            "queues.alerts.0",
            "queue-wide",
        ),
        ({"metric": "depth", "threshold": 1, "for_s": -1}, "queues.alerts.0.for_s", "greater"),
    ],
)
def test_bad_alert_rules_are_rejected_at_spec_load(rule, path, needle):
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool()], "queues": {"alerts": [rule]}})
    errs = dict(exc.value.errors)
    assert path in errs and needle in errs[path], errs


def test_bad_queue_spec_fields_are_named():
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool()], "queues": {"discipline": "lifo"}})
    assert "queues.discipline" in dict(exc.value.errors)
    with pytest.raises(SpecError) as exc:
        parse_spec(
            {"pools": [pool()], "queues": {"utility_decay_per_s": 1, "utility_half_life_s": 5}}
        )
    assert "exclusive" in dict(exc.value.errors)["queues"]
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool()], "queues": {"alerts": ["depth > 1", "depth > 1"]}})
    assert "repeated" in dict(exc.value.errors)["queues"]
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool()], "queues": {"storage": {"backend": "redis"}}})
    assert "queues.storage.backend" in dict(exc.value.errors)
