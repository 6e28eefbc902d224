"""The fleet-wide view of agent health, kept by the controller.

Hosts report their agents' health about once a second on the call that already carries
their autoscaling metric (``AgentHost.record_autoscaling_stats`` ->
``Controller.host_report``). ``FleetHealth`` keeps each host's latest report and runs
the fleet's one ``CascadeGuard`` over the sum: when more than ``cascade_share`` of the
fleet's agents are failing it opens, fires the ``agent_cascade`` alert through the
controller's alert log (the one queue alerts use, so ``fleet status``, ``alerts()`` and
the alert gauge show it), and answers each host's request for restart permits within
the guard's allowance. Probe fates (restarts granted while the guard was not closed)
come back in the reports and move the guard towards closing, gradually.

A host silent for ``HOST_REPORT_TTL_S`` is dropped from the sums (its replica is gone:
Serve replaces it and its successor reports afresh).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from fleet.policy.health import AgentState, CascadeGuard, EventKind, GuardState, HealthEvent
from fleet.policy.queue_alerts import ActiveAlert, AlertEvent, AlertKind
from fleet.spec.health import HealthSpec

HOST_REPORT_TTL_S = 10.0
LAST_FAILURES = 10
CASCADE_ALERT = "agent_cascade"
CASCADE_SEVERITY = "critical"
FLEET_SUBJECT = "fleet"
_GUARD_LEVEL = {GuardState.CLOSED: 0, GuardState.HALF_OPEN: 1, GuardState.OPEN: 2}


class FleetHealth:
    """Latest health per host, the fleet cascade guard and its alert (see module doc).

    ``clock`` returns monotonic seconds; ``on_alert`` receives the guard's alert as an
    ``AlertEvent`` (the controller appends it to its alert log).
    """

    def __init__(
        self,
        spec: HealthSpec,
        pools: Iterable[str],
        on_alert: Callable[[AlertEvent], None] = lambda e: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spec = spec
        self.pools = list(pools)
        self._clock = clock
        self._on_alert = on_alert
        self.guard = CascadeGuard(spec.cascade, [self], name="fleet:cascade")
        self._hosts: dict[
            str, tuple[float, str, dict[str, Any]]
        ] = {}  # host: (t, pool, report)
        self._alert: ActiveAlert | None = None
        self._failing = self._total = 0

    # -- reports in, verdicts out ---------------------------------------------------
    def host_report(self, pool: str, report: dict[str, Any]) -> dict[str, Any]:
        """Take one host's report; answer with the guard's state and its permits."""
        now = self._clock()
        self._hosts[report["host"]] = (now, pool, report)
        for _ in range(int(report.get("probe_failed", 0))):
            self.guard.probe_failed(now)
        for _ in range(int(report.get("probe_ok", 0))):
            self.guard.probe_succeeded(now)
        self.observe(now)
        permits = 0
        for _ in range(int(report.get("restarts_wanted", 0))):
            if not self.guard.try_restart(now):
                break
            permits += 1
        return {"state": self.guard.state.value, "permits": permits}

    def observe(self, now: float | None = None) -> GuardState:
        """Drop silent hosts and re-evaluate the guard on the fleet's sums."""
        now = self._clock() if now is None else now
        for h in [h for h, (t, _, _) in self._hosts.items() if now - t > HOST_REPORT_TTL_S]:
            del self._hosts[h]
        failing = sum(r.get("failing", 0) for _, _, r in self._hosts.values())
        total = sum(r.get("total", 0) for _, _, r in self._hosts.values())
        self._failing, self._total = failing, total
        return self.guard.observe(failing, total, now)

    # -- the guard's alert ----------------------------------------------------------
    def on_health_event(self, event: HealthEvent) -> None:
        share = self._failing / self._total if self._total else 0.0
        threshold = self.spec.cascade.cascade_share
        if event.kind is EventKind.ALERT_FIRING:
            self._alert = ActiveAlert(
                CASCADE_ALERT,
                FLEET_SUBJECT,
                CASCADE_SEVERITY,
                round(share, 4),
                threshold,
                event.at_s,
            )
            kind = AlertKind.FIRED
        elif event.kind is EventKind.ALERT_RESOLVED:
            self._alert = None
            kind = AlertKind.CLEARED
        else:
            return
        self._on_alert(
            AlertEvent(
                kind,
                CASCADE_ALERT,
                FLEET_SUBJECT,
                CASCADE_SEVERITY,
                round(share, 4),
                threshold,
                event.at_s,
                f"{'firing' if kind is AlertKind.FIRED else 'cleared'}: {event.reason}",
            )
        )

    def active_alerts(self) -> list[ActiveAlert]:
        return [self._alert] if self._alert is not None else []

    # -- views ------------------------------------------------------------------------
    def pool_status(self, pool: str) -> dict[str, Any]:
        """Agents per health state, breaker ejections, restarts and the newest failures
        of one pool, summed over its reporting hosts."""
        reports = [r for _, p, r in self._hosts.values() if p == pool]
        counts = {s.value: 0 for s in AgentState}
        failures: dict[str, int] = {}
        last: list[dict[str, Any]] = []
        for r in reports:
            for k, n in r.get("counts", {}).items():
                counts[k] = counts.get(k, 0) + n
            for k, n in r.get("failures", {}).items():
                failures[k] = failures.get(k, 0) + n
            last.extend(r.get("last_failures", []))
        last.sort(key=lambda f: f["at_unix_s"])
        return {
            **counts,
            "breaker_ejected": sum(r.get("breaker_ejected", 0) for r in reports),
            "restarts": sum(r.get("restarts", 0) for r in reports),
            "failures": failures,
            "last_failures": last[-LAST_FAILURES:],
            "hosts_reporting": len(reports),
        }

    def snapshot(self) -> dict[str, Any]:
        """The guard and the fleet's failing share, for ``status()``."""
        now = self._clock()
        self.observe(now)
        return {
            "guard": self.guard.snapshot(now),
            "failing": self._failing,
            "agents": self._total,
            "failing_share": round(self._failing / self._total, 4) if self._total else 0.0,
            "cascade_share": self.spec.cascade.cascade_share,
            "alert": self._alert is not None,
        }


__all__ = ["CASCADE_ALERT", "FleetHealth"]
