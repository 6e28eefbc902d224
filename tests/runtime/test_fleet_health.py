"""The controller's fleet-wide health view on a virtual clock: the hosts' reports summed,
the cascade guard, its alert in the alert log, permits within the allowance, status and
the gauges the controller exports from it."""

from __future__ import annotations

import dataclasses

from fleet.observability.metrics import MemorySink
from fleet.policy.queue_alerts import AlertEvent, AlertKind
from fleet.runtime.control_metrics import ControlMetrics
from fleet.runtime.fleet_health import CASCADE_ALERT, HOST_REPORT_TTL_S, FleetHealth
from fleet.spec.health import HealthSpec
from tests.utils import FakeClock, make_spec, pool


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


def fleet(clock: FakeClock) -> tuple[FleetHealth, list[AlertEvent]]:
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
    return FleetHealth(spec, ["p"], alerts.append, clock), alerts


def test_a_fleet_wide_share_opens_the_guard_fires_the_alert_and_throttles_permits():
    clock = FakeClock(0.0)
    fh, alerts = fleet(clock)
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
    # The controller's gauges, fed from this view each tick.
    sink = MemorySink()
    cm = ControlMetrics(make_spec(pool("p"), name="hf"), sink, resumed=False)
    cm.pool("p", 20, {}, st)
    cm.guard(fh.guard.state.value)
    cm.alerts(fh.active_alerts())
    hf = ("fleet", "hf")  # every series carries the fleet's name
    assert sink.gauges[("fleet_agents", (hf, ("pool", "p"), ("state", "unhealthy")))] == 6
    assert (
        sink.gauges[("fleet_agents", (hf, ("pool", "p"), ("state", "breaker_ejected")))] == 2
    )
    assert sink.gauges[("fleet_cascade_guard_state", (hf,))] == 2
    firing = (hf, ("rule", CASCADE_ALERT), ("severity", "critical"), ("subject", "fleet"))
    assert sink.gauges[("fleet_alerts_firing", firing)] == 1

    # Restarted agents stay up (probes) and the failing share drops: it closes, and the
    # alert clears.
    clock.advance(1)
    fh.host_report("p", report("h1", 0, ok=2))
    assert fh.host_report("p", report("h2", 0, ok=2))["state"] == "closed"
    assert [a.kind for a in alerts] == [AlertKind.FIRED, AlertKind.CLEARED]
    assert fh.active_alerts() == []
    cm.guard(fh.guard.state.value)
    cm.alerts(fh.active_alerts())
    assert sink.gauges[("fleet_cascade_guard_state", (hf,))] == 0
    assert sink.gauges[("fleet_alerts_firing", firing)] == 0


def test_failure_and_restart_counts_follow_each_hosts_totals():
    clock = FakeClock(0.0)
    fh, _ = fleet(clock)
    fh.host_report("p", report("h1", 1, restarts=2, failures={"hung_task": 1}))
    fh.host_report("p", report("h1", 1, restarts=3, failures={"hung_task": 2}))
    fh.host_report("p", report("h2", 0, restarts=1, failures={"error_rate": 1}))
    st = fh.pool_status("p")
    # Each host's latest totals, summed over hosts (a report replaces, never adds).
    assert st["restarts"] == 4
    assert st["failures"] == {"hung_task": 2, "error_rate": 1}


def test_a_silent_host_drops_out_of_the_fleet_sums():
    clock = FakeClock(0.0)
    fh, _ = fleet(clock)
    fh.host_report("p", report("h1", 0))
    fh.host_report("p", report("h2", 0))
    clock.advance(HOST_REPORT_TTL_S + 1)
    fh.host_report("p", report("h2", 0))
    assert fh.snapshot()["agents"] == 10 and fh.pool_status("p")["hosts_reporting"] == 1


def test_fleet_status_text_shows_health_states_failures_and_the_guard():
    from fleet.cli.status import _human

    clock = FakeClock(0.0)
    fh, _ = fleet(clock)
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
