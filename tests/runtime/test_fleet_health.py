"""The controller's fleet-wide health view on a virtual clock: the hosts' reports summed,
the cascade guard, its alert in the alert log, permits within the allowance, status and
Prometheus metrics."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, generate_latest

from fleet.policy.queue_alerts import AlertEvent, AlertKind
from fleet.runtime.fleet_health import CASCADE_ALERT, HOST_REPORT_TTL_S, FleetHealth
from fleet.spec.health import HealthSpec
from tests.utils import FakeClock


def report(
    host: str,
    failing: int,
    total: int = 10,
    wanted: int = 0,
    ok: int = 0,
    bad: int = 0,
    restarts: int = 0,
    failures: dict | None = None,
) -> dict:
    counts = {
        "starting": 0,
        "healthy": total - failing,
        "unhealthy": failing,
        "restarting": 0,
        "ejected": 0,
    }
    return {
        "host": host,
        "failing": failing,
        "total": total,
        "restarts_wanted": wanted,
        "probe_ok": ok,
        "probe_failed": bad,
        "counts": counts,
        "breaker_ejected": 1,
        "restarts": restarts,
        "failures": failures or {},
        "last_failures": [
            {
                "at_unix_s": 1.0 + failing,
                "agent_id": f"{host}/0",
                "reason": "error_rate",
                "detail": "x",
            }
        ]
        if failing
        else [],
    }


def fleet(clock: FakeClock) -> tuple[FleetHealth, list[AlertEvent], CollectorRegistry]:
    spec = HealthSpec(
        cascade={
            "cascade_share": 0.1,
            "max_restarts_per_interval": 2,
            "interval_s": 10,
            "probe_successes": 1,
            "probe_healthy_s": 0,
        }
    )
    alerts: list[AlertEvent] = []
    registry = CollectorRegistry()
    return FleetHealth(spec, ["p"], registry, alerts.append, clock), alerts, registry


def test_a_fleet_wide_share_opens_the_guard_fires_the_alert_and_throttles_permits():
    clock = FakeClock(0.0)
    fh, alerts, registry = fleet(clock)
    # One host alone at 10% of 20 agents: not above the share.
    assert fh.host_report("p", report("h1", 0))["state"] == "closed"
    assert fh.host_report("p", report("h2", 2, wanted=2)) == {"state": "closed", "permits": 2}
    # 6 of 20 (30%) at once: open, one alert, permits within 2 per 10 s across hosts.
    v1 = fh.host_report("p", report("h1", 4, wanted=4))
    assert v1 == {"state": "open", "permits": 2}
    assert fh.host_report("p", report("h2", 2, wanted=2))["permits"] == 0
    assert [(a.kind, a.rule) for a in alerts] == [(AlertKind.FIRED, CASCADE_ALERT)]
    assert alerts[0].value == 0.3 and alerts[0].threshold == 0.1
    assert [a.rule for a in fh.active_alerts()] == [CASCADE_ALERT]
    clock.advance(10)
    assert fh.host_report("p", report("h2", 2, wanted=2))["permits"] == 2

    st = fh.pool_status("p")
    assert (st["healthy"], st["unhealthy"], st["breaker_ejected"]) == (14, 6, 2)
    assert len(st["last_failures"]) == 2 and st["hosts_reporting"] == 2
    fh.update_metrics()
    text = generate_latest(registry).decode()
    assert 'fleet_agents{pool="p",state="unhealthy"} 6.0' in text
    assert "fleet_cascade_guard_state 2.0" in text

    # Restarted agents stay up (probes) and the failing share drops: it closes, and the
    # alert clears.
    clock.advance(1)
    fh.host_report("p", report("h1", 0, ok=2))
    assert fh.host_report("p", report("h2", 0, ok=2))["state"] == "closed"
    assert [a.kind for a in alerts] == [AlertKind.FIRED, AlertKind.CLEARED]
    assert fh.active_alerts() == []


def test_failure_and_restart_counters_follow_each_hosts_totals():
    clock = FakeClock(0.0)
    fh, _, registry = fleet(clock)
    fh.host_report("p", report("h1", 1, restarts=2, failures={"hung_task": 1}))
    fh.host_report("p", report("h1", 1, restarts=3, failures={"hung_task": 2}))
    text = generate_latest(registry).decode()
    assert 'fleet_agent_restarts_total{pool="p"} 3.0' in text
    assert 'fleet_agent_failures_total{pool="p",reason="hung_task"} 2.0' in text


def test_a_silent_host_drops_out_of_the_fleet_sums():
    clock = FakeClock(0.0)
    fh, _, _ = fleet(clock)
    fh.host_report("p", report("h1", 0))
    fh.host_report("p", report("h2", 0))
    clock.advance(HOST_REPORT_TTL_S + 1)
    fh.host_report("p", report("h2", 0))
    assert fh.snapshot()["agents"] == 10 and fh.pool_status("p")["hosts_reporting"] == 1


def test_fleet_status_text_shows_health_states_failures_and_the_guard():
    from fleet.cli.status import _human

    clock = FakeClock(0.0)
    fh, _, _ = fleet(clock)
    fh.host_report("p", report("h2", 0))
    fh.host_report("p", report("h1", 4))  # 4 of 20 failing
    st = {
        "fleet": "f",
        "ledger": {"recorded": 0},
        "health": fh.snapshot(),
        "pools": {"p": {"agents": 20, "hosts": 2, "health": fh.pool_status("p")}},
        "alerts": {"active": [dataclasses.asdict(a) for a in fh.active_alerts()]},
    }
    text = _human(st)
    assert "healthy 16  unhealthy 4  restarting 0  ejected 0 (health) + 2 (breakers)" in text
    assert "h1/0: error_rate: x" in text
    assert "cascade guard open: 4 of 20 agents failing (opens above 10%)" in text
    assert "ALERT critical: agent_cascade on fleet (value 0.2, threshold 0.1)" in text
