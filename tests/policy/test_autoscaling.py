"""The autoscaling policy under a virtual clock: spikes, drains, bounds, rates, noise."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fleet.policy.autoscaling import ScalingInput, ScalingState, decide, raw_desired_agents
from fleet.spec import AutoscalingSpec
from tests.utils import FakeClock


def run(
    spec: AutoscalingSpec,
    clock: FakeClock,
    queued_at,
    seconds: float,
    agents: int | None = None,
    state: ScalingState | None = None,
):
    """Drive ``decide`` every control interval; return the (t, agents, raw) series."""
    agents = spec.start_agents if agents is None else agents
    out = []
    end = clock() + seconds
    while clock() < end:
        d, state = decide(spec, ScalingInput(clock(), agents, queued_at(clock())), state)
        agents = d.agents
        out.append((clock(), agents, d.raw_desired, d.reason))
        clock.advance(spec.control_interval_s)
    return out, state, agents


def test_raw_desired_is_ceil_of_queue_over_target_within_bounds():
    spec = AutoscalingSpec(min_agents=10, max_agents=10_000, target_queued_per_agent=100)
    assert raw_desired_agents(spec, 0) == 10
    assert raw_desired_agents(spec, 1_001) == 11
    assert raw_desired_agents(spec, 50_000, in_flight=50) == 501
    assert raw_desired_agents(spec, 10**9) == 10_000


def test_spike_reaches_target_within_upscale_window_then_drains_slowly():
    spec = AutoscalingSpec(
        min_agents=10,
        max_agents=10_000,
        target_queued_per_agent=100,
        control_interval_s=1,
        upscale_within_s=60,
        downscale_within_s=300,
        downscale_stabilization_s=30,
    )
    clock = FakeClock(0)
    series, state, agents = run(spec, clock, lambda t: 1_000_000, 61)
    assert agents == 10_000, "a spike to max must be reached within upscale_within_s"
    ups = [b[1] - a[1] for a, b in itertools.pairwise(series)]
    per_s = (spec.max_agents - spec.min_agents) / spec.upscale_within_s
    assert max(ups) <= math.ceil(per_s * spec.control_interval_s) + 1
    # Drain: the queue empties; agents fall no faster than (max-min)/300 per second.
    series, _, agents = run(spec, clock, lambda t: 0, 400, agents, state)
    downs = [a[1] - b[1] for a, b in itertools.pairwise(series)]
    assert agents == 10
    assert max(downs) <= math.ceil((spec.max_agents - spec.min_agents) / 300) + 1
    first_drop = next(t2 for (t, a, *_), (t2, a2, *_) in itertools.pairwise(series) if a2 < a)
    assert (
        first_drop - series[0][0] >= spec.downscale_stabilization_s - spec.control_interval_s
    )


def test_bounds_hold_for_any_signal():
    spec = AutoscalingSpec(
        min_agents=3,
        max_agents=40,
        target_queued_per_agent=5,
        upscale_within_s=0,
        downscale_within_s=0,
        downscale_stabilization_s=0,
    )
    rng = random.Random(7)
    clock = FakeClock(0)
    series, *_ = run(spec, clock, lambda t: rng.choice([0, 1, 50, 10**6]), 200)
    assert all(3 <= a <= 40 for _, a, *_ in series)
    assert {a for _, a, *_ in series} >= {3, 40}


def test_per_interval_caps_limit_both_directions():
    spec = AutoscalingSpec(
        min_agents=1,
        max_agents=1000,
        upscale_within_s=0,
        upscale_max_agents_per_interval=7,
        downscale_within_s=0,
        downscale_max_fraction_per_interval=0.5,
        downscale_stabilization_s=0,
        target_queued_per_agent=1,
    )
    clock = FakeClock(0)
    series, state, agents = run(spec, clock, lambda t: 10_000, 5)
    assert [a for _, a, *_ in series] == [8, 15, 22, 29, 36]
    series, _, _ = run(spec, clock, lambda t: 0, 3, agents, state)
    assert [a for _, a, *_ in series] == [18, 9, 5]


def test_stabilization_prevents_flapping_on_noisy_signal():
    spec = AutoscalingSpec(
        min_agents=1,
        max_agents=100,
        target_queued_per_agent=10,
        upscale_within_s=0,
        downscale_within_s=0,
        downscale_stabilization_s=20,
    )
    rng = random.Random(3)
    clock = FakeClock(0)
    # Noise between 300 and 500 queued: raw desired jumps between 30 and 50 every tick.
    series, *_ = run(spec, clock, lambda t: rng.randint(300, 500), 120)
    downs = sum(1 for a, b in itertools.pairwise(series) if b[1] < a[1])
    assert downs <= 3, f"flapped down {downs} times"
    settled = [a for t, a, *_ in series if t >= 20]
    assert min(settled) >= 45 and max(settled) <= 50, "should sit at the top of the noise band"


def test_cooldown_delays_a_second_move():
    spec = AutoscalingSpec(
        min_agents=1,
        max_agents=100,
        target_queued_per_agent=1,
        upscale_within_s=0,
        upscale_cooldown_s=5,
    )
    clock = FakeClock(0)
    d1, st = decide(spec, ScalingInput(0, 1, 10), None)
    d2, st = decide(spec, ScalingInput(1, d1.agents, 50), st)
    d3, st = decide(spec, ScalingInput(6, d1.agents, 50), st)
    assert (d1.agents, d2.agents, d2.reason, d3.agents) == (10, 10, "cooldown", 50)
    assert clock() == 0


@pytest.mark.parametrize("mode,expected", [("hold", 17), ("min", 2), ("max", 90)])
def test_missing_metrics_fallback(mode, expected):
    spec = AutoscalingSpec(min_agents=2, max_agents=90, missing_metrics=mode)
    d, _ = decide(spec, ScalingInput(0, 17, None), None)
    assert (d.agents, d.reason) == (expected, "missing_metrics")


def test_out_of_bounds_count_moves_to_bound_at_once():
    spec = AutoscalingSpec(min_agents=5, max_agents=10)
    assert decide(spec, ScalingInput(0, 50, 0))[0].agents == 10
    assert decide(spec, ScalingInput(0, 0, 10**6))[0].agents == 5


def test_average_upscale_rate_is_the_configured_rate_with_late_ticks():
    # 95 agents over 5 s = 19 agents/s; ticks of 0.25 s arrive late (0.33 s).
    spec = AutoscalingSpec(
        min_agents=2,
        max_agents=97,
        target_queued_per_agent=1,
        control_interval_s=0.25,
        upscale_within_s=5,
    )
    clock = FakeClock(0)
    agents, state = 2, None
    while agents < 97:
        d, state = decide(spec, ScalingInput(clock(), agents, 10**6), state)
        agents = d.agents
        clock.advance(0.33)
    assert clock() <= 5 + 0.33 + 1e-9, f"took {clock():.2f}s to close a gap that 5 s allows"
