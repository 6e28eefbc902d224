"""Queue-depth autoscaling of logical agents: a pure policy with an explicit state.

The policy is a function of a snapshot and the previous state, returning a decision and
the new state (the shape of Ray Serve's ``autoscaling_policy``): no clock, no I/O. The
live controller, the tests (with a virtual clock) and the simulator all call ``decide``.

Rules, in order:
1. raw desired = ceil((queued + in_flight + shed) / target_queued_per_agent), within
   bounds (``shed``: tasks admission control refused lately);
   when the queue depth is unknown, ``missing_metrics`` says hold, min or max.
2. scale-down follows the *highest* raw desired value seen over the stabilization
   window, so a noisy signal cannot make the pool flap.
3. the change is rate-limited. Each direction has a rate of (max - min) / within_s
   agents per second (so any gap closes within ``within_s``), accrued as credit between
   calls, plus optional per-interval caps in agents and as a fraction of the current
   count; cooldowns delay a move after the last one.
4. the result always lies within [min_agents, max_agents].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fleet.spec.autoscaling import AutoscalingSpec


@dataclass(frozen=True, slots=True)
class ScalingInput:
    """What the controller measured at ``now_s`` (seconds, any monotonic origin)."""

    now_s: float
    current_agents: int
    queued: int | None  # None when the queue could not be read
    in_flight: int = 0
    # Tasks admission control refused lately (``fleet.policy.admission``): demand the
    # queue never saw, counted as queued so a pool with headroom grows and stops shedding.
    shed: int = 0


@dataclass(frozen=True, slots=True)
class ScalingState:
    last_tick_s: float | None = None
    last_up_s: float | None = None
    last_down_s: float | None = None
    up_credit: float = 0.0
    down_credit: float = 0.0
    # (time, raw desired) samples inside the downscale stabilization window
    window: tuple[tuple[float, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    agents: int
    raw_desired: int
    reason: str  # up | down | hold | missing_metrics | cooldown | stabilizing | bounds


def raw_desired_agents(spec: AutoscalingSpec, queued: int, in_flight: int = 0) -> int:
    """ceil((queued + in_flight) / target per agent), clamped to the spec's bounds."""
    want = math.ceil((max(queued, 0) + max(in_flight, 0)) / spec.target_queued_per_agent)
    return min(spec.max_agents, max(spec.min_agents, want))


def _rate_per_s(spec: AutoscalingSpec, within_s: float) -> float:
    span = max(spec.max_agents - spec.min_agents, 1)
    return math.inf if within_s == 0 else span / within_s


def _cap(step: int, current: int, max_agents: int | None, max_fraction: float | None) -> int:
    if max_agents is not None:
        step = min(step, max_agents)
    if max_fraction is not None:
        step = min(step, max(1, math.floor(current * max_fraction)))
    return step


def _accrue(credit: float, rate: float, dt: float, interval: float) -> float:
    if math.isinf(rate):
        return math.inf
    # Credit banks at most one tick's worth plus one agent, so a quiet spell cannot
    # release a burst beyond the configured rate; the +1 keeps the fraction that
    # floor() leaves behind, and a late tick earns its whole elapsed time, so the
    # average rate is the configured one.
    return min(credit + rate * dt, rate * max(dt, interval) + 1.0)


def decide(
    spec: AutoscalingSpec, inp: ScalingInput, state: ScalingState | None = None
) -> tuple[ScalingDecision, ScalingState]:
    """One control step: the number of agents to run now, and the state to pass next time."""
    state = state or ScalingState()
    current = inp.current_agents
    now = inp.now_s
    interval = spec.control_interval_s
    # The first decision gets one interval's allowance, as if a tick had just passed.
    dt = interval if state.last_tick_s is None else max(0.0, now - state.last_tick_s)
    up_rate = _rate_per_s(spec, spec.upscale_within_s)
    down_rate = _rate_per_s(spec, spec.downscale_within_s)
    state = replace(
        state,
        last_tick_s=now,
        up_credit=_accrue(state.up_credit, up_rate, dt, interval),
        down_credit=_accrue(state.down_credit, down_rate, dt, interval),
    )

    # Out of bounds (a new spec, or a first call): move to the nearest bound at once.
    if current < spec.min_agents or current > spec.max_agents:
        bounded = min(spec.max_agents, max(spec.min_agents, current))
        return ScalingDecision(bounded, bounded, "bounds"), state

    if inp.queued is None:
        target = {"hold": current, "min": spec.min_agents, "max": spec.max_agents}[
            spec.missing_metrics
        ]
        return ScalingDecision(target, target, "missing_metrics"), state

    raw = raw_desired_agents(spec, inp.queued + max(inp.shed, 0), inp.in_flight)
    horizon = now - spec.downscale_stabilization_s
    window = (*(s for s in state.window if s[0] > horizon), (now, raw))
    state = replace(state, window=window)

    if raw > current:
        if state.last_down_s is not None and now - state.last_down_s < spec.upscale_cooldown_s:
            return ScalingDecision(current, raw, "cooldown"), state
        if state.last_up_s is not None and now - state.last_up_s < spec.upscale_cooldown_s:
            return ScalingDecision(current, raw, "cooldown"), state
        allowed = raw - current if math.isinf(state.up_credit) else math.floor(state.up_credit)
        step = _cap(
            min(raw - current, allowed),
            current,
            spec.upscale_max_agents_per_interval,
            spec.upscale_max_fraction_per_interval,
        )
        if step <= 0:
            return ScalingDecision(current, raw, "hold"), state
        credit = state.up_credit if math.isinf(state.up_credit) else state.up_credit - step
        return ScalingDecision(current + step, raw, "up"), replace(
            state, up_credit=credit, last_up_s=now
        )

    stable = max(s[1] for s in window)
    if stable >= current:
        reason = "stabilizing" if raw < current else "hold"
        return ScalingDecision(current, raw, reason), state
    last_move = max(state.last_up_s or -math.inf, state.last_down_s or -math.inf)
    if now - last_move < spec.downscale_cooldown_s:
        return ScalingDecision(current, raw, "cooldown"), state
    allowed = (
        current - stable if math.isinf(state.down_credit) else math.floor(state.down_credit)
    )
    step = _cap(
        min(current - stable, allowed),
        current,
        spec.downscale_max_agents_per_interval,
        spec.downscale_max_fraction_per_interval,
    )
    if step <= 0:
        return ScalingDecision(current, raw, "hold"), state
    credit = state.down_credit if math.isinf(state.down_credit) else state.down_credit - step
    return ScalingDecision(current - step, raw, "down"), replace(
        state, down_credit=credit, last_down_s=now
    )
