"""Graceful degradation's rule (``fleet.policy.degrade``) on a virtual clock."""

from __future__ import annotations

import pytest

from fleet.policy.admission import LEVELS, AdmissionRule, PoolLoad, predicted_wait_s
from fleet.policy.degrade import Degrader, DegradeSignals, ErrorRate, fallback_of
from fleet.spec.admission import AdmissionSpec
from fleet.spec.budgets import BudgetsSpec
from fleet.spec.degrade import DegradeSpec


def test_it_starts_on_any_signal_and_ends_only_after_staying_calm():
    d = Degrader(
        "work",
        DegradeSpec(
            to_pool="small",
            predicted_wait_s=2.0,
            error_rate=0.5,
            recover_share=0.5,
            recover_after_s=10,
        ),
    )
    assert d.step(DegradeSignals(predicted_wait_s=1.9, error_rate=0.4), 0) is None
    rule = d.step(DegradeSignals(predicted_wait_s=1.0, error_rate=0.5), 1)
    assert rule == "work.error_rate >= 0.5" and d.started_total == 1
    # Below the threshold but not below half of it: still degraded, however long.
    assert d.step(DegradeSignals(predicted_wait_s=1.5, error_rate=0.1), 30) == rule
    # Calm (every signal under half its threshold; one not measured counts as calm)...
    assert d.step(DegradeSignals(predicted_wait_s=0.9, error_rate=None), 31) == rule
    assert d.step(DegradeSignals(predicted_wait_s=0.9, error_rate=0.1), 40) == rule
    # ... and a relapse restarts the count.
    assert d.step(DegradeSignals(predicted_wait_s=1.2, error_rate=0.1), 40.5) == rule
    assert d.step(DegradeSignals(predicted_wait_s=0.2, error_rate=0.0), 41) == rule
    assert d.step(DegradeSignals(predicted_wait_s=0.2, error_rate=0.0), 50.9) == rule
    assert d.step(DegradeSignals(predicted_wait_s=0.2, error_rate=0.0), 51) is None
    assert d.step(DegradeSignals(predicted_wait_s=2.5), 52) == "work.predicted_wait_s >= 2"
    assert d.started_total == 2


def test_a_task_follows_the_fallbacks_of_degraded_pools():
    to_pool = {"big": "mid", "mid": "small"}
    assert fallback_of("big", {}, to_pool) == ("big", None)
    assert fallback_of("big", {"big": "r1"}, to_pool) == ("mid", "r1")
    assert fallback_of("big", {"big": "r1", "mid": "r2"}, to_pool) == ("small", "r1")
    assert fallback_of("mid", {"big": "r1"}, to_pool) == ("mid", None)
    assert fallback_of("small", {"small": "r3"}, to_pool) == ("small", None)  # no fallback


def test_the_predicted_wait_signal_is_admission_controls_prediction():
    rule = AdmissionRule.of(AdmissionSpec(), BudgetsSpec())
    load = PoolLoad(
        rule=rule,
        taken_unix_s=100.0,
        pending=tuple(50 if p == 9 else 0 for p in range(LEVELS)),
        drain_per_s=10.0,
        arrivals_per_s=(0.0,) * LEVELS,
        by_priority=True,
        slots=1,
    )
    # 50 ahead at 10/s, then its own 0.1 s; a second later 10 of them have gone.
    assert abs(predicted_wait_s(load, 100.0) - 5.1) < 1e-9
    assert abs(predicted_wait_s(load, 101.0) - 4.1) < 1e-9
    unmeasured = PoolLoad(rule, 100.0, (0,) * LEVELS, None, (0.0,) * LEVELS, True)
    assert predicted_wait_s(unmeasured, 100.0) is None


def test_error_rate_is_measured_between_steps_and_survives_a_counter_reset():
    fresh = ErrorRate()  # no totals seen yet: the first step only sets the baseline
    assert fresh.step(100, 10) is None
    assert fresh.step(130, 20) == pytest.approx(10 / 40)
    assert fresh.step(130, 20) is None  # nothing finished since
    # A restarted dispatcher counts again from 0: a fall is no change, then it goes on.
    assert fresh.step(5, 0) is None
    assert fresh.step(8, 1) == pytest.approx(1 / 4)
    since_start = ErrorRate(0, 0)  # the simulator's: from the start of the run
    assert since_start.step(3, 1) == pytest.approx(1 / 4)
