"""One task on one agent of an ``AgentHost``: the agent's reply, or its failure, as an
``Outcome``.

The host has given the task a slot (and a budget reservation) before; it counts the
outcome, settles the reservation and frees the slot after. In between, here: the agent
instance is made if it does not exist yet, handles the task, and what comes back is
checked and priced. The reasons a run fails with:

- ``timeout``: cancelled by the host's watchdog, past ``task_timeout_s``;
- ``bad_output``: the reply's output is not JSON;
- ``output_too_large``: its JSON is over ``results.max_output_bytes``;
- ``error``: the agent (or its setup) raised; the exception's one-line text, cut to
  ``MAX_ERROR_CHARS``, then its traceback, cut to ``observability.traceback_chars``
  (``failure_text``). The host lives on.

Each failed run is logged on ``fleet.task`` at WARNING, with its task id, pool, agent,
reason and error (``fleet.observability.logs``); a completed one is not.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import TYPE_CHECKING

import orjson

from fleet.agent import Reply
from fleet.llm.caps import price_of
from fleet.llm.errors import ProviderError
from fleet.observability.logs import TASK_LOG, log_event
from fleet.policy.preemption import PREEMPTED
from fleet.task import Item, Outcome, Task, failed_outcome, item_to_task

if TYPE_CHECKING:
    from fleet.runtime.cpu_meter import CpuMeter
    from fleet.runtime.host import AgentHost

MAX_ERROR_CHARS = 2000
REASON_OUTPUT_TOO_LARGE = "output_too_large"
TRUNCATED = "... [{n} chars truncated]\n"  # where a traceback's head was cut
# Room for what a retry verdict puts before a failure's text ("max_attempts after
# attempt 3: error: ", ``fleet.policy.host.Retries``) and for the truncation marker.
ERROR_PREFIX_CHARS = 200


def error_text(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """An exception's one-line text (type and message), cut to ``limit`` characters."""
    return "".join(traceback.format_exception_only(exc)).strip()[:limit]


def failure_text(exc: BaseException, traceback_chars: int) -> str:
    """What a failed result keeps of an agent's exception: ``error_text``, then its
    formatted traceback (chained causes included) cut to its last ``traceback_chars``
    characters, where the raising frame is, behind a ``TRUNCATED`` marker naming how
    much went. ``traceback_chars`` 0: the one line alone.

    The one-line text comes first: retry rules match the exception's name at the start
    (``fleet.policy.retry.error_name``), and listings show the first line."""
    line = error_text(exc)
    if traceback_chars <= 0:
        return line
    tb = "".join(traceback.format_exception(exc)).rstrip("\n")
    if len(tb) > traceback_chars:
        cut = len(tb) - traceback_chars
        tb = TRUNCATED.format(n=cut) + tb[cut:]
    return f"{line}\n{tb}"


def max_error_chars(traceback_chars: int) -> int:
    """The longest error text a failed result of a host with ``traceback_chars`` may
    carry, a retry verdict's prefix included: a cap that never cuts a traceback."""
    return MAX_ERROR_CHARS + traceback_chars + ERROR_PREFIX_CHARS


def failed_run(
    host: AgentHost,
    item: Item,
    reason: str,
    error: str,
    agent_id: str | None = None,
    started: float | None = None,
) -> Outcome:
    """A failed run's outcome, logged once as ``task_failed``: a run that failed on its
    agent, a wait for a free agent that timed out, a wedged task abandoned. (Budget
    refusals are logged by ``fleet.runtime.host_budget`` as ``budget_refused``.)"""
    pool = host.pool.name
    log_event(
        TASK_LOG,
        logging.WARNING,
        "task_failed",
        task_id=item.id,
        pool=pool,
        agent_id=agent_id,
        reason=reason,
        delivery=item.deliveries,
        error=error,
    )
    return failed_outcome(item, reason, error, pool, agent_id, started)


async def run_on_agent(
    host: AgentHost, i: int, item: Item, task: Task | None, meter: CpuMeter | None = None
) -> Outcome:
    """Run ``item`` (``task``: its decoded form, when the host has made it already) on
    the host's agent ``i`` and return its outcome; costs come from the host's prices
    for the model the reply names (0 for an unpriced one). ``meter``: adds up the CPU
    seconds of the agent's handling (``fleet.runtime.cpu_meter``)."""
    pool = host.pool.name
    agent_id = host.core.agents[i].id
    started = time.time()
    try:
        agent = await host.agent_set.get(i)
        handling = agent.handle(task or item_to_task(item))
        if meter is not None and asyncio.iscoroutine(handling):
            handling = meter.run(handling)
        reply = await handling
        if not isinstance(reply, Reply):
            reply = Reply(reply)
        output = orjson.dumps(reply.output)
        if len(output) > host.max_output_bytes:
            return failed_run(
                host,
                item,
                REASON_OUTPUT_TOO_LARGE,
                f"output is {len(output)} bytes encoded, over results.max_output_bytes"
                f"={host.max_output_bytes}",
                agent_id,
                started,
            )
        price = price_of(host.prices, reply.model)
        cost = price.cost_usd(reply.input_tokens, reply.output_tokens) if price else 0.0
        return Outcome(
            item.id, True, output, None, None, agent_id, pool,
            item.deliveries, item.submitted_unix_s, started, time.time(),
            reply.input_tokens, reply.output_tokens, cost, None, item.degraded,
        )  # fmt: skip
    except asyncio.CancelledError:
        if asyncio.current_task() in host.preempted:  # not a failure: handed back
            return failed_outcome(item, PREEMPTED, "preempted", pool, agent_id, started)
        return failed_run(
            host,
            item,
            "timeout",
            f"exceeded task_timeout_s={host.resilience.task_timeout_s}",
            agent_id,
            started,
        )
    except orjson.JSONEncodeError as exc:
        return failed_run(
            host, item, "bad_output", f"output is not JSON: {exc}", agent_id, started
        )
    except Exception as exc:  # the agent's own failure: recorded, the host lives on
        text = failure_text(exc, host.observability.traceback_chars)
        reason = "error"
        if isinstance(exc, ProviderError):  # a provider's failure keeps its reason
            reason = exc.fleet_reason
            if exc.retry_after_s:  # ... and its Retry-After bounds the retry's delay
                host.retry_after[item.id] = exc.retry_after_s
        return failed_run(host, item, reason, text, agent_id, started)
