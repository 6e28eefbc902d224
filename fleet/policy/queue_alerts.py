"""Queue alert rules: fire when a metric crosses its threshold, clear when it comes back.

Pure: ``evaluate_alerts(rules, observations, state, now_s)`` returns the events of this
tick and the new state; ``AlertEvaluator`` keeps that state for a caller that evaluates
every control tick. Rules come from ``QueueSpec.alerts`` (``QueueAlertRule``);
observations from ``fleet.queue.monitor.QueueMonitor.observations``.

Per (rule, subject) the state machine is:

    ok --cond(threshold) holds--> pending --held for_s--> firing
    pending --cond fails--> ok
    firing --cond(clear_threshold) fails, or subject gone--> ok (a "cleared" event)

``clear_threshold`` (default: the threshold) gives hysteresis, so a value hovering at
the threshold does not flap. A subject whose metric is not reported this tick keeps its
state; a subject that disappeared entirely clears its alerts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from fleet.spec.queues import AlertScope, QueueAlertRule

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True, slots=True)
class Observations:
    """Metric values by subject: ``queues`` ("support") and ``shards`` ("support/0")."""

    queues: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    shards: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def scope(self, scope: AlertScope) -> Mapping[str, Mapping[str, float]]:
        return self.queues if scope is AlertScope.QUEUE else self.shards


class AlertKind(str, Enum):
    FIRED = "fired"
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A state change of one rule on one subject."""

    kind: AlertKind
    rule: str
    subject: str
    severity: str
    value: float | None  # None when cleared because the subject is gone
    threshold: float
    at_s: float
    message: str


@dataclass(frozen=True, slots=True)
class ActiveAlert:
    """A firing alert, for ``fleet status`` and the alert gauge."""

    rule: str
    subject: str
    severity: str
    value: float
    threshold: float
    since_s: float


@dataclass(frozen=True, slots=True)
class AlertState:
    """Per (rule name, subject): since when the condition holds, and what fires."""

    pending_since_s: Mapping[tuple[str, str], float] = field(default_factory=dict)
    firing: Mapping[tuple[str, str], ActiveAlert] = field(default_factory=dict)


def _describe(rule: QueueAlertRule, subject: str, value: float) -> str:
    return (
        f"{rule.scope.value} {subject}: {rule.metric.value} = {value:g} "
        f"{rule.op} {rule.threshold:g}"
    )


def evaluate_alerts(
    rules: Sequence[QueueAlertRule],
    observations: Observations,
    state: AlertState,
    now_s: float,
) -> tuple[list[AlertEvent], AlertState]:
    """One evaluation tick: the fired/cleared events and the new state."""
    pending = dict(state.pending_since_s)
    firing = dict(state.firing)
    events: list[AlertEvent] = []
    names = set()
    for rule in rules:
        name = rule.rule_name
        names.add(name)
        cmp = _OPS[rule.op]
        clear_at = rule.threshold if rule.clear_threshold is None else rule.clear_threshold
        subjects = observations.scope(rule.scope)
        for subject, metrics in subjects.items():
            k = (name, subject)
            value = metrics.get(rule.metric.value)
            if value is None:
                continue
            active = firing.get(k)
            if active is not None:
                if cmp(value, clear_at):
                    firing[k] = ActiveAlert(
                        name, subject, rule.severity, value, rule.threshold, active.since_s
                    )
                else:
                    del firing[k]
                    events.append(
                        AlertEvent(
                            AlertKind.CLEARED,
                            name,
                            subject,
                            rule.severity,
                            value,
                            rule.threshold,
                            now_s,
                            f"cleared: {rule.scope.value} {subject}: {rule.metric.value} = "
                            f"{value:g}, no longer {rule.op} {clear_at:g}",
                        )
                    )
                continue
            if not cmp(value, rule.threshold):
                pending.pop(k, None)
                continue
            since = pending.setdefault(k, now_s)
            if now_s - since >= rule.for_s:
                del pending[k]
                firing[k] = ActiveAlert(
                    name, subject, rule.severity, value, rule.threshold, now_s
                )
                held = f" for {now_s - since:g} s" if rule.for_s else ""
                events.append(
                    AlertEvent(
                        AlertKind.FIRED,
                        name,
                        subject,
                        rule.severity,
                        value,
                        rule.threshold,
                        now_s,
                        f"firing: {_describe(rule, subject, value)}{held}",
                    )
                )
        # Subjects that vanished (a queue removed, a shard gone) clear their alerts.
        for k in [k for k in firing if k[0] == name and k[1] not in subjects]:
            a = firing.pop(k)
            events.append(
                AlertEvent(
                    AlertKind.CLEARED,
                    name,
                    k[1],
                    a.severity,
                    None,
                    a.threshold,
                    now_s,
                    f"cleared: {rule.scope.value} {k[1]} no longer reported",
                )
            )
        for k in [k for k in pending if k[0] == name and k[1] not in subjects]:
            del pending[k]
    # Rules removed from the spec: their alerts clear too.
    for k in [k for k in firing if k[0] not in names]:
        a = firing.pop(k)
        events.append(
            AlertEvent(
                AlertKind.CLEARED,
                k[0],
                k[1],
                a.severity,
                None,
                a.threshold,
                now_s,
                f"cleared: rule {k[0]!r} removed",
            )
        )
    pending = {k: v for k, v in pending.items() if k[0] in names}
    return events, AlertState(pending, firing)


class AlertEvaluator:
    """Keeps the alert state between ticks and tells listeners about changes.

    Use: ``events = evaluator.evaluate(monitor.observations(now), now)`` each control
    tick; ``evaluator.active()`` for status and metrics.
    """

    def __init__(
        self,
        rules: Sequence[QueueAlertRule],
        listeners: Sequence[Callable[[AlertEvent], None]] = (),
    ):
        self.rules = tuple(rules)
        self.listeners = list(listeners)
        self.state = AlertState()

    def evaluate(self, observations: Observations, now_s: float) -> list[AlertEvent]:
        events, self.state = evaluate_alerts(self.rules, observations, self.state, now_s)
        for e in events:
            for listener in self.listeners:
                listener(e)
        return events

    def active(self) -> list[ActiveAlert]:
        return sorted(self.state.firing.values(), key=lambda a: (a.rule, a.subject))


__all__ = [
    "ActiveAlert",
    "AlertEvaluator",
    "AlertEvent",
    "AlertKind",
    "AlertState",
    "Observations",
    "evaluate_alerts",
]
