"""A task's budget reservation as a cap on its model calls, so it cannot spend more than
it reserved.

The host books a task's estimate (``budgets.task_estimates``) before it runs and sets
the reservation as the task's ``Cap`` (a context variable: each task runs in its own
asyncio task, so every agent sees its own task's). Before each call a model client
takes from the cap what the call may spend at most (``hold``): its input at an upper
bound, and as many output tokens as what is left allows, which it asks for as
``max_tokens``; after the call it gives back the difference to what the provider
reported (``release``), all of it when the call failed. Calls a task makes at once
each hold their own share, so together they cannot pass the reservation either.

The input's bound needs no tokenizer (none that downloads its tables): a token is at
least one byte of UTF-8, so a request's input is at most its UTF-8 bytes (as JSON) in
tokens. That is about four times what English text uses: to leave room for the reply,
``task_estimates[pool].input_tokens`` must cover the prompts' bytes. A call whose
input alone could exceed what is left is not made: the task fails with
``budget_exhausted`` (``CapExceeded``), never overspending.

The cap also counts what the calls used (``used_tokens``, ``used_usd``): the host
settles a task at no less than that, whatever the agent's reply reports.
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
    resource is not capped), priced with ``prices`` (model -> ``ModelPrice``, looked up
    with ``price_of``), and what its calls used. ``of_grant`` leaves uncapped what the
    reservation did not book (an estimate of 0)."""

    tokens: int | None
    usd: float | None
    prices: dict[str, Any]
    used_tokens: int = 0
    used_usd: float = 0.0

    def max_output(self, model: str, input_upper: int) -> int | None:
        """The most output tokens a call of ``model`` with at most ``input_upper`` input
        tokens may ask for now (None: no cap), or raise ``CapExceeded``."""
        caps: list[int] = []
        if self.tokens is not None:
            caps.append(self.tokens - input_upper)
        price = price_of(self.prices, model)
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
                f"(its input may be up to {input_upper} tokens, its UTF-8 bytes; left: "
                f"{'-' if self.tokens is None else self.tokens} tokens, "
                f"{'-' if self.usd is None else f'{self.usd:.6f}'} USD): raise "
                "budgets.task_estimates for its pool"
            )
        return out

    def hold(self, model: str, input_upper: int, want: int) -> int:
        """Take what a call may spend at most: its input's bound and up to ``want``
        output tokens (fewer if that is all that is left); returns the output tokens it
        may ask for. Give it back with ``release``."""
        most = self.max_output(model, input_upper)
        out = want if most is None else min(want, most)
        self._take(model, input_upper, out, 1)
        return out

    def release(
        self, model: str, input_upper: int, held_out: int, used_in: int = 0, used_out: int = 0
    ) -> None:
        """Give back a ``hold`` less what the call used (as its provider reported)."""
        self._take(model, input_upper, held_out, -1)
        self._take(model, used_in, used_out, 1)
        self.used_tokens += used_in + used_out
        price = price_of(self.prices, model)
        if price is not None:
            self.used_usd += price.cost_usd(used_in, used_out)

    def _take(self, model: str, input_tokens: int, output_tokens: int, sign: int) -> None:
        if self.tokens is not None:
            self.tokens -= sign * (input_tokens + output_tokens)
        price = price_of(self.prices, model)
        if self.usd is not None and price is not None:
            self.usd -= sign * price.cost_usd(input_tokens, output_tokens)

    @classmethod
    def of_grant(cls, tokens: int, usd: float, prices: dict[str, Any]) -> Cap:
        """The cap of a reservation of ``tokens`` and ``usd`` (0: not booked)."""
        return cls(tokens or None, usd or None, prices)


def price_of(prices: dict[str, Any], model: str | None) -> Any:
    """The price of ``model``: its own, else that of the longest priced name it starts
    with (providers answer with dated names: ``gpt-4o-2024-08-06`` is ``gpt-4o``'s).
    None: not priced."""
    if not model:
        return None
    price = prices.get(model)
    if price is not None:
        return price
    best = max((k for k in prices if model.startswith(k)), key=len, default=None)
    return None if best is None else prices[best]


CURRENT: ContextVar[Cap | None] = ContextVar("fleet_llm_cap", default=None)


def input_upper_bound(messages: Any, tools: Any = None) -> int:
    """An upper bound of a request's input tokens: its UTF-8 bytes (a token is at least
    one byte), messages and tools as JSON."""
    n = len(orjson.dumps(messages))
    if tools:
        n += len(orjson.dumps(tools))
    return n
