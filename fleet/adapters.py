"""Agents from plain functions and from framework runnables.

``agent_from(fn)`` turns ``async def fn(payload, ctx) -> result`` into an ``Agent``
class; ``agent_from(runnable)`` does the same for anything with ``ainvoke`` (a
LangChain ``Runnable`` or your own), without fleet depending on the framework. Bind
the class to a module-level name and name it in the pool's ``agent_class``, as any
agent::

    async def summarize(payload, ctx):
        c = await ctx.llm.complete(payload["text"])
        return Reply({"summary": c.text}, c.input_tokens, c.output_tokens, c.model)

    Summarizer = agent_from(summarize, capabilities=("summarize",))

``ctx`` (``Context``) is the agent: its id, the task, ``ctx.llm`` (the pool's model) and
``ctx.call_dependency``. A function's result is the task's output, or a ``Reply`` to
report tokens. A runnable is invoked with the task's payload; its result's ``content``
(a chat message's), or the result itself, is the output, and the tokens and model come
from its ``usage_metadata`` (``input_tokens``, ``output_tokens``) and
``response_metadata`` (``model_name`` or ``model``, priced by the longest priced name it
starts with) when it has them. The output must be JSON (a graph's state of message
objects is not: return what to keep). A runnable calls its own model client, which a
budget's reservation does not cap (``fleet.llm.caps`` caps ``self.llm``): settle such
pools by their estimates.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fleet.agent import Agent, Reply
from fleet.task import Task


class Context:
    """What a function agent sees besides the payload: the agent itself."""

    __slots__ = ("_agent", "task")

    def __init__(self, agent: Agent, task: Task):
        self._agent = agent
        self.task = task

    @property
    def agent_id(self) -> str:
        return self._agent.agent_id

    @property
    def llm(self) -> Any:
        return self._agent.llm

    async def call_dependency(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """``Agent.call_dependency``: ``call()`` through dependency ``name``'s breaker."""
        return await self._agent.call_dependency(name, call)


def runnable_reply(result: Any) -> Reply:
    """A runnable's result as a ``Reply`` (the module docstring)."""
    if isinstance(result, Reply):
        return result
    usage = getattr(result, "usage_metadata", None) or {}
    meta = getattr(result, "response_metadata", None) or {}
    output = getattr(result, "content", result)
    return Reply(
        output,
        int(usage.get("input_tokens", 0) or 0),
        int(usage.get("output_tokens", 0) or 0),
        meta.get("model_name") or meta.get("model"),
    )


def agent_from(
    obj: Any, capabilities: tuple[str, ...] = (), name: str | None = None
) -> type[Agent]:
    """An ``Agent`` class that runs ``obj``: an ``async def (payload, ctx)`` function, or
    an object with ``ainvoke`` (see the module docstring). ``name``: the class's name
    (default: from ``obj``'s); give the name it is bound to, and the class pickles by
    reference too."""
    if hasattr(obj, "ainvoke"):
        runnable = obj

        async def handle(self: Agent, task: Task) -> Any:
            return runnable_reply(await runnable.ainvoke(task.payload))

        default = type(obj).__name__
    elif inspect.iscoroutinefunction(obj):
        fn = obj

        async def handle(self: Agent, task: Task) -> Any:
            return await fn(task.payload, Context(self, task))

        default = getattr(obj, "__name__", "fn")
    else:
        raise TypeError(
            "agent_from: expected an async function (payload, ctx) or an object with "
            f"ainvoke, got {obj!r}"
        )
    cls_name = name or f"{default[:1].upper()}{default[1:]}Agent"
    # The module that made it (where it is bound, for the pool's agent_class).
    module = sys._getframe(1).f_globals.get("__name__", __name__)
    return type(
        cls_name,
        (Agent,),
        {
            "capabilities": tuple(capabilities),
            "handle": handle,
            "__doc__": f"An agent running {default} (fleet.agent_from).",
            "__module__": module,
            "__qualname__": cls_name,
        },
    )
