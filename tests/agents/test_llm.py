"""One LLM latency model: the simulated client, the simulator's ``kind: llm`` and the
live-versus-simulated comparison all draw from ``fleet.agents.llm.LatencyModel``."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from fleet.agents.llm import LatencyModel, SimulatedLLM


def test_the_simulated_client_sleeps_what_the_model_draws():
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    model = LatencyModel(time_scale=0.5)
    llm = SimulatedLLM("m", model, random.Random(3), sleep)
    replies = asyncio.run(_complete(llm, 20))
    draw = model.sampler(random.Random(3))
    expected = [draw(512) for _ in range(20)]
    assert slept == [d for d, _ in expected]
    assert [c.output_tokens for c in replies] == [n for _, n in expected]
    capped = SimulatedLLM("m", LatencyModel(output_tokens_median=1e6), random.Random(0), sleep)
    assert asyncio.run(_complete(capped, 1))[0].output_tokens == 512, "max_tokens caps"


async def _complete(llm: SimulatedLLM, n: int) -> list:
    return [await llm.complete("hello there", max_tokens=512) for _ in range(n)]


def test_the_simulator_draws_the_same_model():
    from fleet.sim.distributions import duration_sampler
    from fleet.sim.scenario import LLMDuration

    dist = LLMDuration(kind="llm", time_scale=0.1)
    model = LatencyModel(time_scale=0.1)
    assert dist.latency_model() == model
    assert dist.mean_s == pytest.approx(model.mean_s)
    defaults = LLMDuration(kind="llm").model_dump(exclude={"kind"})
    assert defaults == dataclasses.asdict(LatencyModel()), "one set of defaults"
    sim = duration_sampler(dist, random.Random(9))
    draw = model.sampler(random.Random(9))
    assert [sim() for _ in range(50)] == [draw()[0] for _ in range(50)]
    many = [sim() for _ in range(20_000)]
    assert sum(many) / len(many) == pytest.approx(model.mean_s, rel=0.05)
