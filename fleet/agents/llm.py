"""An LLM client interface, the LLM latency model, and a simulated client.

``LatencyModel`` is fleet's one model of an LLM call's latency, used by the simulated
client here, by the simulator's ``kind: llm`` service time (``fleet.sim.scenario.
LLMDuration``) and by the live-versus-simulated comparison (``fleet.sim.live``): latency
= time to first token (lognormal) + output tokens (lognormal, rounded, at least 1) /
``tokens_per_s``, all times ``time_scale``. ``SimulatedLLM`` sleeps for a draw of it and
reports its token use; prompt tokens are estimated from the prompt's length. A real
client implements ``LLMClient``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    model: str
    input_tokens: int
    output_tokens: int


class LLMClient(Protocol):
    async def complete(self, prompt: str, max_tokens: int = 512) -> Completion: ...


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """The latency of one LLM call (see the module docstring), with seconds-scale
    defaults shaped like a hosted chat model; ``time_scale`` shrinks every delay (0.01 =
    100x faster). ``sigma`` fields are log-space standard deviations."""

    ttft_median_s: float = 0.35
    ttft_sigma: float = 0.5
    tokens_per_s: float = 80.0
    output_tokens_median: float = 120.0
    output_tokens_sigma: float = 0.6
    time_scale: float = 1.0

    @property
    def mean_s(self) -> float:
        """Mean latency in seconds (lognormal means; the rounding of tokens ignored)."""
        ttft = self.ttft_median_s * math.exp(self.ttft_sigma**2 / 2)
        out = self.output_tokens_median * math.exp(self.output_tokens_sigma**2 / 2)
        return self.time_scale * (ttft + out / self.tokens_per_s)

    def sampler(self, rng: random.Random) -> Callable[[float], tuple[float, int]]:
        """A callable drawing one call from ``rng``: ``draw(max_tokens=inf)`` ->
        (latency in seconds, output tokens, capped at ``max_tokens``).

        Output tokens are drawn first, then the time to first token. Built once and
        called per call: the simulator draws millions, so the parameters are bound
        here, and a lognormal is ``exp`` of ``Random.gauss`` (about twice as fast as
        ``Random.lognormvariate``, the same distribution).
        """
        g, exp = rng.gauss, math.exp
        mu_t, s_t = math.log(self.ttft_median_s), self.ttft_sigma
        mu_o, s_o = math.log(self.output_tokens_median), self.output_tokens_sigma
        tps, scale = self.tokens_per_s, self.time_scale

        def draw(max_tokens: float = math.inf) -> tuple[float, int]:
            out = max(1, round(exp(g(mu_o, s_o))))
            if out > max_tokens:
                out = int(max_tokens)
            return (exp(g(mu_t, s_t)) + out / tps) * scale, out

        return draw


class SimulatedLLM:
    """Simulated chat model: sleeps for a realistic time, reports realistic token use."""

    def __init__(
        self,
        model: str = "sim-small",
        latency: LatencyModel | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.model = model
        self.latency = latency or LatencyModel()
        self._draw = self.latency.sampler(rng or random.Random())
        self._sleep = sleep

    async def complete(self, prompt: str, max_tokens: int = 512) -> Completion:
        delay_s, out_tokens = self._draw(max_tokens)
        in_tokens = max(1, len(prompt) // 4)  # ~4 characters a token
        await self._sleep(delay_s)
        return Completion(
            f"[{self.model}] reply to {prompt[:40]!r}", self.model, in_tokens, out_tokens
        )
