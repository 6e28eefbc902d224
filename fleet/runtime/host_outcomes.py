"""One task on one agent of an ``AgentHost``: the agent's reply, or its failure, as an
``Outcome``.

The host has given the task a slot (and a budget reservation) before; it counts the
outcome, settles the reservation and frees the slot after. In between, here: the agent
instance is made if it does not exist yet, handles the task, and what comes back is
checked and priced. The reasons a run fails with:

- ``timeout``: cancelled by the host's watchdog, past ``task_timeout_s``;
- ``bad_output``: the reply's output is not JSON;
- ``output_too_large``: its JSON is over ``results.max_output_bytes``;
- ``error``: the agent (or its setup) raised; the exception's text, cut to
  ``MAX_ERROR_CHARS``. The host lives on.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import TYPE_CHECKING

import orjson

from fleet.agent import Reply
from fleet.task import Item, Outcome, Task, failed_outcome, item_to_task

if TYPE_CHECKING:
    from fleet.runtime.host import AgentHost

MAX_ERROR_CHARS = 2000
REASON_OUTPUT_TOO_LARGE = "output_too_large"


def error_text(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """An exception's one-line text (type and message), cut to ``limit`` characters."""
    return "".join(traceback.format_exception_only(exc)).strip()[:limit]


async def run_on_agent(host: AgentHost, i: int, item: Item, task: Task | None) -> Outcome:
    """Run ``item`` (``task``: its decoded form, when the host has made it already) on
    the host's agent ``i`` and return its outcome; costs come from the host's prices
    for the model the reply names (0 for an unpriced one)."""
    pool = host.pool.name
    agent_id = host.core.agents[i].id
    started = time.time()
    try:
        agent = await host.agent_set.get(i)
        reply = await agent.handle(task or item_to_task(item))
        if not isinstance(reply, Reply):
            reply = Reply(reply)
        output = orjson.dumps(reply.output)
        if len(output) > host.max_output_bytes:
            return failed_outcome(
                item,
                REASON_OUTPUT_TOO_LARGE,
                f"output is {len(output)} bytes encoded, over results.max_output_bytes"
                f"={host.max_output_bytes}",
                pool,
                agent_id,
                started,
            )
        price = host.prices.get(reply.model or "")
        cost = price.cost_usd(reply.input_tokens, reply.output_tokens) if price else 0.0
        return Outcome(
            item.id, True, output, None, None, agent_id, pool,
            item.deliveries, item.submitted_unix_s, started, time.time(),
            reply.input_tokens, reply.output_tokens, cost,
        )  # fmt: skip
    except asyncio.CancelledError:
        return failed_outcome(
            item,
            "timeout",
            f"exceeded task_timeout_s={host.resilience.task_timeout_s}",
            pool,
            agent_id,
            started,
        )
    except orjson.JSONEncodeError as exc:
        return failed_outcome(
            item, "bad_output", f"output is not JSON: {exc}", pool, agent_id, started
        )
    except Exception as exc:  # the agent's own failure: recorded, the host lives on
        return failed_outcome(item, "error", error_text(exc), pool, agent_id, started)
