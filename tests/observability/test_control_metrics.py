"""The controller's metrics (``ControlMetrics``) recorded into a ``MemorySink``: queue
counters advance by the growth of the shards' totals, gauges follow the shards, pools,
health, alerts and budgets, and labels stay within the configured tenants."""

from __future__ import annotations

import dataclasses

import pytest

from fleet.observability.metrics import MemorySink
from fleet.policy.queue_alerts import AlertEvaluator
from fleet.queue.lease_queue import LeaseQueue
from fleet.queue.monitor import QueueMonitor
from fleet.runtime.control_metrics import ControlMetrics
from fleet.spec.queues import QueueAlertRule
from tests.queue.helpers import item
from tests.utils import make_spec, pool

T0 = 1_700_000_000.0
FLEET = "ops"  # the spec's name: every series is labelled fleet=FLEET
F = ("fleet", FLEET)
SUPPORT = (F, ("queue", "support"), ("shard", "0"))


def _stats(q: LeaseQueue, now: float) -> dict:
    return dataclasses.asdict(q.stats(now))


def _metrics(resumed: bool = False, **spec) -> tuple[ControlMetrics, MemorySink]:
    sink = MemorySink()
    spec.setdefault("name", FLEET)
    return ControlMetrics(make_spec(**spec), sink, resumed=resumed), sink


def _fleets(sink: MemorySink) -> set[str]:
    """The fleet label's values over every series the sink holds."""
    keys = (*sink.counters, *sink.gauges, *sink.histograms)
    return {dict(tags)["fleet"] for _, tags in keys}


def test_queue_counters_follow_the_growth_of_shard_totals_and_gauges_the_stats():
    cm, sink = _metrics()
    q = LeaseQueue(100)
    q.put([item(i, T0) for i in range(10)])
    q.lease(3, "h", 1.0, 0.0)
    cm.shard("support", 0, _stats(q, T0 + 5))
    q.expire(2.0)
    cm.shard("support", 0, _stats(q, T0 + 6))
    c, g = sink.counters, sink.gauges
    assert c[("fleet_queue_enqueued_total", SUPPORT)] == 10
    assert c[("fleet_queue_lease_expiries_total", SUPPORT)] == 3
    assert c[("fleet_queue_redeliveries_total", SUPPORT)] == 3
    assert ("fleet_queue_acked_total", SUPPORT) not in c  # nothing acked: no increment
    assert g[("fleet_queue_depth", SUPPORT)] == 10
    assert g[("fleet_queue_leased", SUPPORT)] == 0
    assert g[("fleet_queue_oldest_age_seconds", SUPPORT)] == 6.0
    # Unchanged totals add nothing (one counter call per growth, none per tick).
    calls = sink.calls
    cm.shard("support", 0, _stats(q, T0 + 7))
    assert c[("fleet_queue_enqueued_total", SUPPORT)] == 10
    assert sink.calls - calls == 3  # the three gauges only
    assert g[("fleet_queue_oldest_age_seconds", SUPPORT)] == 7.0
    # Acks advance the acked counter by exactly their number.
    q.ack([i.id for i in q.lease(4, "h", 1.0, 0.0)])
    cm.shard("support", 0, _stats(q, T0 + 8))
    assert c[("fleet_queue_acked_total", SUPPORT)] == 4
    assert g[("fleet_queue_depth", SUPPORT)] == 6
    # Shards are separate series.
    other = LeaseQueue(10)
    other.put([item("o", T0)])
    cm.shard("support", 1, _stats(other, T0))
    assert c[("fleet_queue_enqueued_total", (F, ("queue", "support"), ("shard", "1")))] == 1
    assert sink.total("fleet_queue_enqueued_total", queue="support") == 11
    assert sink.total("fleet_queue_enqueued_total", fleet=FLEET) == 11
    assert _fleets(sink) == {FLEET}


def test_a_restarted_shards_lower_totals_count_as_new_and_never_decrease():
    cm, sink = _metrics()
    q = LeaseQueue(100)
    q.put([item(i, T0) for i in range(10)])
    cm.shard("support", 0, _stats(q, T0))
    cm.shard("support", 0, _stats(LeaseQueue(10), T0))  # restarted: totals back to 0
    assert sink.counters[("fleet_queue_enqueued_total", SUPPORT)] == 10
    fresh = LeaseQueue(10)
    fresh.put([item("z", T0)])
    cm.shard("support", 0, _stats(fresh, T0))
    assert sink.counters[("fleet_queue_enqueued_total", SUPPORT)] == 11
    # Another restart, seen first at 0 and then growing: only the growth counts.
    again = LeaseQueue(10)
    again.put([item("y", T0)])
    cm.shard("support", 0, {**_stats(again, T0), "enqueued_total": 0})
    cm.shard("support", 0, _stats(again, T0))
    assert sink.counters[("fleet_queue_enqueued_total", SUPPORT)] == 12
    assert sink.gauges[("fleet_queue_depth", SUPPORT)] == 1


def test_a_resumed_controller_takes_the_first_totals_as_its_baseline():
    cm, sink = _metrics(resumed=True)
    q = LeaseQueue(100)
    q.put([item(i, T0) for i in range(10)])
    q.ack([i.id for i in q.lease(4, "h", 1.0, 0.0)])
    cm.shard("support", 0, _stats(q, T0))
    # The predecessor counted these: nothing again, but the gauges are set.
    assert sink.total("fleet_queue_enqueued_total") == 0
    assert sink.total("fleet_queue_acked_total") == 0
    assert sink.gauges[("fleet_queue_depth", SUPPORT)] == 6
    q.put([item(f"n{i}", T0) for i in range(5)])
    q.ack([i.id for i in q.lease(2, "h", 1.0, 0.0)])
    cm.shard("support", 0, _stats(q, T0 + 1))
    assert sink.counters[("fleet_queue_enqueued_total", SUPPORT)] == 5
    assert sink.counters[("fleet_queue_acked_total", SUPPORT)] == 2
    # A shard first seen after the resume is a baseline too.
    other = LeaseQueue(10)
    other.put([item("o", T0)])
    cm.shard("support", 1, _stats(other, T0))
    assert sink.total("fleet_queue_enqueued_total", shard="1") == 0
    assert _fleets(sink) == {FLEET}
    # A fresh (not resumed) controller counts the first totals whole.
    fresh, fresh_sink = _metrics(resumed=False)
    fresh.shard("support", 0, _stats(q, T0 + 1))
    assert fresh_sink.counters[("fleet_queue_enqueued_total", SUPPORT)] == 15


def test_alerts_are_1_while_firing_and_0_once_cleared():
    cm, sink = _metrics()
    q = LeaseQueue(10)
    q.put([item("z", T0)])
    m = QueueMonitor()
    m.observe("support", 0, q.stats(T0), 0.0)
    ev = AlertEvaluator([QueueAlertRule.model_validate("depth > 0")])
    ev.evaluate(m.observations(0.0), 0.0)
    assert len(ev.active()) == 1
    key = (
        "fleet_alerts_firing",
        (F, ("rule", "depth > 0"), ("severity", "warning"), ("subject", "support")),
    )
    cm.alerts(ev.active())
    assert sink.gauges == {key: 1}
    cm.alerts(ev.active())  # still firing: still 1
    assert sink.gauges == {key: 1}
    calls = sink.calls
    cm.alerts([])
    assert sink.gauges == {key: 0}
    cm.alerts([])  # cleared once: no more samples for it
    assert sink.calls == calls + 1


def test_guard_and_control_actor_restarts():
    cm, sink = _metrics()
    for state, level in (("closed", 0), ("open", 2), ("half_open", 1)):
        cm.guard(state)
        assert sink.gauges[("fleet_cascade_guard_state", (F,))] == level
    cm.control_actors(
        {"fleet-ctl": {"restarts": 2}, "fleet-q": {"restarts": 0}, "gone": {"error": "x"}}
    )
    assert sink.gauges == {
        ("fleet_cascade_guard_state", (F,)): 1,
        ("fleet_control_actor_restarts", (("actor", "fleet-ctl"), F)): 2,
        ("fleet_control_actor_restarts", (("actor", "fleet-q"), F)): 0,
    }


def test_pool_gauges_come_from_dispatcher_stats_and_health():
    from fleet.runtime.fleet_health import FleetHealth
    from fleet.spec.health import HealthSpec

    cm, sink = _metrics()
    fh = FleetHealth(HealthSpec(), ["work"])
    fh.host_report(
        "work",
        {
            "host": "h1",
            "failing": 3,
            "total": 10,
            "counts": {"healthy": 6, "unhealthy": 3, "restarting": 1},
            "breaker_ejected": 2,
        },
    )
    fh.host_report(
        "work",
        {"host": "h2", "failing": 0, "total": 5, "counts": {"healthy": 5}},
    )
    disp = {"in_flight": 7, "ejected_agents": 2, "max_ejected_agents": 3}
    cm.pool("work", 15, disp, fh.pool_status("work"))
    g = {(n, dict(t).get("state")): v for (n, t), v in sink.gauges.items()}
    assert all(dict(t)["pool"] == "work" for _, t in sink.gauges)
    assert _fleets(sink) == {FLEET}
    assert g[("fleet_agents_desired", None)] == 15
    assert g[("fleet_in_flight", None)] == 7
    assert g[("fleet_breaker_ejected_agents", None)] == 2
    assert g[("fleet_breaker_max_ejected_agents", None)] == 3
    assert g[("fleet_hosts", None)] == 2
    assert g[("fleet_agents", "healthy")] == 11
    assert g[("fleet_agents", "unhealthy")] == 3
    assert g[("fleet_agents", "restarting")] == 1
    assert g[("fleet_agents", "starting")] == 0 and g[("fleet_agents", "ejected")] == 0
    assert g[("fleet_agents", "breaker_ejected")] == 2
    # A pool with no dispatcher stats or reports yet: zeros, not missing series.
    cm.pool("idle", 1, {}, fh.pool_status("idle"))
    assert sink.gauges[("fleet_hosts", (F, ("pool", "idle")))] == 0
    assert sink.gauges[("fleet_agents", (F, ("pool", "idle"), ("state", "healthy")))] == 0


def _budget(name: str, scope: str, fleet: str = FLEET) -> tuple[tuple[str, str], ...]:
    return (("fleet", fleet), ("name", name), ("scope", scope))


def test_budgets_export_spend_burn_limit_and_remaining_of_configured_scopes_only():
    cm, sink = _metrics(
        pools=[pool("work"), pool("free"), pool("idle")],
        budgets={
            "daily_usd": 10.0,
            "pools": {"work": {"daily_usd": 2.0}, "idle": {"daily_usd": 3.0}},
            "tenants": {"acme": {"daily_usd": 1.0}, "quiet": {"daily_usd": 0.5}},
        },
        observability={"metric_tenants": ["beta"]},
    )
    snap = {
        "fleet": {"used_usd": 3.0, "burn_usd_per_h": 1.5, "limit_usd": 10.0},
        "pools": {
            "work": {"spend_usd": 2.5, "burn_usd_per_h": 1.0},
            "free": {"spend_usd": 0.5, "burn_usd_per_h": 0.5},
        },
        "tenants": {
            "acme": {"spend_usd": 0.25, "burn_usd_per_h": 0.1},
            "beta": {"spend_usd": 0.5, "burn_usd_per_h": 0.2},
            "zeta": {"spend_usd": 2.25, "burn_usd_per_h": 0.7},
        },
    }
    cm.budgets(snap)
    g = sink.gauges

    def row(name: str, scope: str) -> dict[str, float]:
        return {n: v for (n, t), v in g.items() if t == _budget(name, scope)}

    assert row("all", "fleet") == {
        "fleet_budget_spend_usd": 3.0,
        "fleet_budget_burn_usd_per_hour": 1.5,
        "fleet_budget_limit_usd": 10.0,
        "fleet_budget_remaining_usd": 7.0,
    }
    assert row("work", "pool") == {
        "fleet_budget_spend_usd": 2.5,
        "fleet_budget_burn_usd_per_hour": 1.0,
        "fleet_budget_limit_usd": 2.0,
        "fleet_budget_remaining_usd": 0.0,  # overspent: never negative
    }
    # No limit: spend and burn only.
    assert row("free", "pool") == {
        "fleet_budget_spend_usd": 0.5,
        "fleet_budget_burn_usd_per_hour": 0.5,
    }
    # A limit on a pool that spent nothing yet: all of it remains.
    assert row("idle", "pool") == {
        "fleet_budget_spend_usd": 0.0,
        "fleet_budget_burn_usd_per_hour": 0.0,
        "fleet_budget_limit_usd": 3.0,
        "fleet_budget_remaining_usd": 3.0,
    }
    assert row("acme", "tenant") == {
        "fleet_budget_spend_usd": 0.25,
        "fleet_budget_burn_usd_per_hour": 0.1,
        "fleet_budget_limit_usd": 1.0,
        "fleet_budget_remaining_usd": 0.75,
    }
    assert row("quiet", "tenant") == {
        "fleet_budget_spend_usd": 0.0,
        "fleet_budget_burn_usd_per_hour": 0.0,
        "fleet_budget_limit_usd": 0.5,
        "fleet_budget_remaining_usd": 0.5,
    }
    # A metric tenant without a budget: spend and burn.
    assert row("beta", "tenant") == {
        "fleet_budget_spend_usd": 0.5,
        "fleet_budget_burn_usd_per_hour": 0.2,
    }
    # A tenant neither in budgets.tenants nor observability.metric_tenants: no series.
    assert not [t for _, t in g if ("name", "zeta") in t]
    assert {dict(t)["name"] for _, t in g} == {
        "all",
        "work",
        "free",
        "idle",
        "acme",
        "quiet",
        "beta",
    }
    assert _fleets(sink) == {FLEET}


def test_budget_gauges_from_a_real_book_snapshot():
    """The book's own snapshot (not a hand-made one) carries what the gauges need: the
    pool's and the configured tenant's daily limits among them."""
    from fleet.runtime.budget_actor import BudgetBook
    from fleet.runtime.budget_client import Grant
    from tests.utils import FakeClock

    clock = FakeClock(1_000_000.0)
    spec = make_spec(
        pool("work"),
        name="books",
        budgets={
            "daily_usd": 1.0,
            "pools": {"work": {"daily_usd": 0.5}},
            "tenants": {"acme": {"daily_usd": 0.25}},
            "task_estimates": {"work": {"usd": 0.01}},
        },
    )
    book = BudgetBook(spec, clock)
    grants = [
        Grant(*g)
        for g in book.reserve_batch(
            [("h/0", "work", "acme"), ("h/1", "work", "zeta"), ("h/2", "work", None)]
        )
    ]
    assert all(g.reservation_id is not None for g in grants)
    clock.advance(60)
    book.settle_batch([(g.reservation_id, 0.01, 100, 0.0) for g in grants])
    sink = MemorySink()
    ControlMetrics(spec, sink, resumed=False).budgets(book.snapshot())
    g = sink.gauges
    assert _fleets(sink) == {"books"}  # the spec's name, whatever it is

    def _books(name: str, scope: str) -> tuple[tuple[str, str], ...]:
        return _budget(name, scope, fleet="books")

    assert g[("fleet_budget_spend_usd", _books("all", "fleet"))] == pytest.approx(0.03)
    assert g[("fleet_budget_remaining_usd", _books("all", "fleet"))] == pytest.approx(0.97)
    assert g[("fleet_budget_spend_usd", _books("work", "pool"))] == pytest.approx(0.03)
    assert g[("fleet_budget_burn_usd_per_hour", _books("work", "pool"))] > 0
    assert g[("fleet_budget_spend_usd", _books("acme", "tenant"))] == pytest.approx(0.01)
    assert not [t for _, t in g if ("name", "zeta") in t]
    # The pool's and tenant's limits (set in the spec) are exported with what is left.
    assert g.get(("fleet_budget_limit_usd", _books("work", "pool"))) == 0.5
    assert g.get(("fleet_budget_remaining_usd", _books("work", "pool"))) == pytest.approx(0.47)
    assert g.get(("fleet_budget_limit_usd", _books("acme", "tenant"))) == 0.25
    assert g.get(("fleet_budget_remaining_usd", _books("acme", "tenant"))) == pytest.approx(
        0.24
    )
