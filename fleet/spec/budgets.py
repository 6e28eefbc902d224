"""Budgets section: token prices, used to put a cost on every result."""

from __future__ import annotations

from pydantic import Field

from fleet.spec._base import SpecModel


class ModelPrice(SpecModel):
    """Price of one LLM model in USD per million tokens."""

    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok
        ) / 1e6


class BudgetsSpec(SpecModel):
    """Prices per model name; results are costed with them."""

    prices: dict[str, ModelPrice] = Field(default_factory=dict)
