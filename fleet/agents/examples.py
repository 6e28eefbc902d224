"""Example agents that need no network: support, checkout, analytics, and a no-op."""

from __future__ import annotations

import asyncio
from typing import Any

from fleet.agent import Agent, Reply
from fleet.agents.llm import LatencyModel, LLMClient, SimulatedLLM
from fleet.policy.hashing import STABLE_HASH_SPAN, stable_hash64
from fleet.task import Task


class _LLMAgent(Agent):
    """Shared set-up for agents that talk to an LLM client."""

    def __init__(
        self,
        agent_id: str,
        model: str = "sim-small",
        time_scale: float = 1.0,
        fail_rate: float = 0.0,
        llm: LLMClient | None = None,
        **kwargs: Any,
    ):
        super().__init__(agent_id, **kwargs)
        self.llm = llm or SimulatedLLM(model, LatencyModel(time_scale=time_scale))
        self.fail_rate = fail_rate
        self.handled = 0  # state kept across tasks

    def _maybe_fail(self, task: Task) -> None:
        # Deterministic per task id, so a failure is reproducible from the ledger.
        if stable_hash64(task.id) / STABLE_HASH_SPAN < self.fail_rate:
            raise RuntimeError(f"simulated upstream error for task {task.id}")


class SupportAgent(_LLMAgent):
    """Answers a customer question; remembers how many tickets it has handled."""

    capabilities = ("support",)

    async def handle(self, task: Task) -> Reply:
        self._maybe_fail(task)
        question = str((task.payload or {}).get("question", ""))
        c = await self.llm.complete(f"You are a support agent. Customer asks: {question}")
        self.handled += 1
        return Reply(
            {"answer": c.text, "ticket": self.handled},
            c.input_tokens,
            c.output_tokens,
            c.model,
        )


class CheckoutAgent(_LLMAgent):
    """Validates a cart and prices it, asking the LLM for a fraud assessment."""

    capabilities = ("checkout",)

    async def handle(self, task: Task) -> Reply:
        self._maybe_fail(task)
        items = (task.payload or {}).get("items", [])
        if not isinstance(items, list):
            raise ValueError("payload.items must be a list")
        total = sum(float(i.get("price", 0)) * int(i.get("qty", 1)) for i in items)
        c = await self.llm.complete(f"Assess fraud risk of an order of {total:.2f} USD")
        self.handled += 1
        return Reply(
            {"total_usd": round(total, 2), "risk": c.text},
            c.input_tokens,
            c.output_tokens,
            c.model,
        )


def _crunch(values: list[float], rounds: int) -> dict[str, float]:
    acc = 0.0
    for _ in range(rounds):
        for v in values:
            acc = (acc * 1.0000001 + v) % 1e9
    n = max(len(values), 1)
    mean = sum(values) / n
    return {"mean": mean, "checksum": acc}


class AnalyticsAgent(Agent):
    """CPU-bound: aggregates a series of numbers (in a thread, off the event loop)."""

    capabilities = ("analytics",)

    def __init__(self, agent_id: str, rounds: int = 20, **kwargs: Any):
        super().__init__(agent_id, **kwargs)
        self.rounds = rounds

    async def handle(self, task: Task) -> dict[str, float]:
        values = [float(v) for v in (task.payload or {}).get("values", [])]
        return await asyncio.to_thread(_crunch, values, self.rounds)


class NoopAgent(Agent):
    """Returns at once: measures fleet's own overhead."""

    capabilities = ("noop",)

    async def handle(self, task: Task) -> None:
        return None
