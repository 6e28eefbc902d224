"""Graceful degradation (``pools[].degrade``, ``fleet.spec.degrade``): when a pool's
signals say it is in trouble, its new tasks go to its fallback pool. Pure; the
controller steps one ``Degrader`` per pool with a degrade rule each tick (its clock),
and publishes the rule that holds in the pool's ``PoolLoad.degraded``; the entry points
send the pool's new tasks to the fallback (``fallback_of``).

Start: any signal at or over its threshold. End: every signal below ``recover_share``
of its threshold, continuously for ``recover_after_s`` (a signal not measured counts as
below: a pool whose hosts report nothing cannot hold degradation on forever). While on,
the rule named is the first signal that started it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleet.spec.degrade import DegradeSpec

DEGRADED = "degraded"  # what entry points count a task sent to its pool's fallback as


@dataclass(frozen=True)
class DegradeSignals:
    """A pool's signals at one tick (None: not measured)."""

    predicted_wait_s: float | None = None
    error_rate: float | None = None
    ejected_share: float | None = None


class ErrorRate:
    """A pool's error rate since the last ``step``, from its outcome totals (the
    controller's from the dispatcher, the simulator's own). Totals that fell (a
    restarted dispatcher counts again from 0) count as no change. ``None``: nothing
    finished since the last step, or no totals seen before this one."""

    __slots__ = ("_last",)

    def __init__(self, done: int | None = None, failed: int | None = None):
        self._last = None if done is None or failed is None else (done, failed)

    def step(self, done: int, failed: int) -> float | None:
        last, self._last = self._last, (done, failed)
        if last is None:
            return None
        d_done, d_failed = max(0, done - last[0]), max(0, failed - last[1])
        return d_failed / (d_done + d_failed) if d_done + d_failed else None


class Degrader:
    """One pool's degradation state."""

    def __init__(self, pool: str, spec: DegradeSpec):
        self.pool = pool
        self.spec = spec
        self._thresholds = spec.thresholds()
        self.rule: str | None = None  # the rule that holds now (None: not degraded)
        self._calm_since: float | None = None  # all signals below the recovery level
        self.started_total = 0

    def step(self, signals: DegradeSignals, now_s: float) -> str | None:
        """The rule that holds after this tick's ``signals`` (None: not degraded),
        named ``<pool>.<signal> >= <threshold>``."""
        over = [
            s
            for s, t in self._thresholds.items()
            if (v := getattr(signals, s)) is not None and v >= t
        ]
        if self.rule is None:
            if over:
                s = over[0]
                self.rule = f"{self.pool}.{s} >= {self._thresholds[s]:g}"
                self.started_total += 1
                self._calm_since = None
            return self.rule
        calm = all(
            (v := getattr(signals, s)) is None or v < self.spec.recover_share * t
            for s, t in self._thresholds.items()
        )
        if not calm:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now_s
        if calm and now_s - self._calm_since >= self.spec.recover_after_s:  # type: ignore[operator]
            self.rule = None
            self._calm_since = None
        return self.rule


def fallback_of(
    pool: str, degraded: Mapping[str, str | None], to_pool: Mapping[str, str]
) -> tuple[str, str | None]:
    """Where a new task for ``pool`` goes: (pool, the rule that sent it there, None
    when it stays). Follows the fallbacks of degraded pools (the spec refuses a cycle):
    a task for a degraded pool goes to its fallback, or, if that is degraded too, on to
    its fallback; the rule named is the first one that fired."""
    rule = None
    seen = {pool}
    while (r := degraded.get(pool)) is not None and pool in to_pool:
        rule = rule or r
        pool = to_pool[pool]
        if pool in seen:  # not reachable with a valid spec; stop rather than loop
            break
        seen.add(pool)
    return pool, rule
