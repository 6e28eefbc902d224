"""A task's budget reservation as a cap on its model calls, so it cannot spend more than
it reserved.

The host books a task's estimate (``budgets.task_estimates``) before it runs and sets
the reservation as the task's ``Cap`` (a context variable: each task runs in its own
asyncio task, so every agent sees its own task's). A model client asks the cap before
each call: the most output tokens the call may ask for (``max_output``), from what is
left of the reservation's tokens and USD once the call's input is counted at an upper
bound, and records the call's reported usage after it (``spend``). The input's bound
needs no tokenizer (none that downloads its tables): a token is at least one byte of
UTF-8, so a request's input is at most its UTF-8 bytes in tokens.

A call whose input alone could exceed what is left is not made: the task fails with
``budget_exhausted`` (``CapExceeded``; its estimate is too small for it), never
overspending.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson

from fleet.llm.errors import CapExceeded


@dataclass
class Cap:
    """What is left of one task's reservation: ``tokens`` and ``usd`` (None: that
    resource is not capped), priced with ``prices`` (model -> ``ModelPrice``).
    ``of_grant`` leaves uncapped what the reservation did not book (an estimate of 0)."""

    tokens: int | None
    usd: float | None
    prices: dict[str, Any]

    def max_output(self, model: str, input_upper: int) -> int | None:
        """The most output tokens a call of ``model`` with at most ``input_upper`` input
        tokens may ask for (None: no cap), or raise ``CapExceeded``."""
        caps: list[int] = []
        if self.tokens is not None:
            caps.append(self.tokens - input_upper)
        price = self.prices.get(model)
        if self.usd is not None and price is not None:
            left = self.usd - price.cost_usd(input_upper, 0)
            per_out = price.output_usd_per_mtok / 1e6
            if per_out > 0:
                caps.append(math.floor(left / per_out))
            elif left < 0:  # output is free, but the input alone is over
                caps.append(0)
        if not caps:
            return None
        out = min(caps)
        if out < 1:
            raise CapExceeded(
                f"this call of {model} could spend more than the task reserved "
                f"(its input may be up to {input_upper} tokens; left: "
                f"{'-' if self.tokens is None else self.tokens} tokens, "
                f"{'-' if self.usd is None else f'{self.usd:.6f}'} USD): raise "
                "budgets.task_estimates for its pool"
            )
        return out

    def spend(self, model: str, input_tokens: int, output_tokens: int) -> None:
        """Count a call's reported usage against what is left."""
        if self.tokens is not None:
            self.tokens -= input_tokens + output_tokens
        price = self.prices.get(model)
        if self.usd is not None and price is not None:
            self.usd -= price.cost_usd(input_tokens, output_tokens)

    @classmethod
    def of_grant(cls, tokens: int, usd: float, prices: dict[str, Any]) -> Cap:
        """The cap of a reservation of ``tokens`` and ``usd`` (0: not booked)."""
        return cls(tokens or None, usd or None, prices)


CURRENT: ContextVar[Cap | None] = ContextVar("fleet_llm_cap", default=None)


def input_upper_bound(messages: Any, tools: Any = None) -> int:
    """An upper bound of a request's input tokens: its UTF-8 bytes (a token is at least
    one byte), messages and tools as JSON."""
    n = len(orjson.dumps(messages))
    if tools:
        n += len(orjson.dumps(tools))
    return n
