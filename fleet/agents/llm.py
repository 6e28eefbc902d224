"""An LLM client interface and a simulated implementation that needs no network.

``SimulatedLLM`` draws latency and token counts from distributions shaped like hosted
chat models: latency = time to first token (lognormal) + output tokens / tokens-per-s;
prompt and completion sizes are lognormal. A real client implements ``LLMClient``.
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
    """Seconds-scale defaults; ``time_scale`` shrinks every delay (0.01 = 100x faster)."""

    ttft_median_s: float = 0.35
    ttft_sigma: float = 0.5
    tokens_per_s: float = 80.0
    output_tokens_median: int = 120
    output_tokens_sigma: float = 0.6
    time_scale: float = 1.0


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
        self._rng = rng or random.Random()
        self._sleep = sleep

    def _lognormal(self, median: float, sigma: float) -> float:
        return self._rng.lognormvariate(math.log(median), sigma)

    async def complete(self, prompt: str, max_tokens: int = 512) -> Completion:
        lat = self.latency
        out_tokens = min(
            max_tokens,
            max(1, round(self._lognormal(lat.output_tokens_median, lat.output_tokens_sigma))),
        )
        in_tokens = max(1, len(prompt) // 4)  # ~4 characters a token
        delay = (
            self._lognormal(lat.ttft_median_s, lat.ttft_sigma) + out_tokens / lat.tokens_per_s
        )
        await self._sleep(delay * lat.time_scale)
        return Completion(
            f"[{self.model}] reply to {prompt[:40]!r}", self.model, in_tokens, out_tokens
        )
