"""Agents from functions and runnables (``fleet.agent_from``): on a host first (no Ray),
then live, a fleet with one pool of each, whose results carry the function's output
and the runnable's content, tokens and model; and a pool's ``runtime_env`` reaching
its hosts."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from fleet import Agent, Reply, agent_from
from fleet.runtime.host import AgentHost
from fleet.task import to_item
from tests.utils import FakeLedger, make_spec, pool


async def shout(payload: Any, ctx: Any) -> Any:
    c = await ctx.llm.complete(payload["text"], max_tokens=3)
    return Reply({"loud": payload["text"].upper(), "agent": ctx.agent_id}, 1, c.output_tokens)


class _Message:
    """What a chat runnable returns (a LangChain ``AIMessage``'s shape)."""

    def __init__(self, content: str):
        self.content = content
        self.usage_metadata = {"input_tokens": 11, "output_tokens": 4}
        self.response_metadata = {"model_name": "fake-chat"}


class FakeChain:
    """Anything with ``ainvoke``: here, a chain that reverses the text."""

    async def ainvoke(self, value: Any) -> _Message:
        await asyncio.sleep(0)
        return _Message(value["text"][::-1])


async def greet(payload: Any, ctx: Any) -> Any:
    return os.environ.get("FLEET_GREETING")  # from the pool's runtime_env


Shout = agent_from(shout, capabilities=("shout",))
Greet = agent_from(greet)
Chain = agent_from(FakeChain(), capabilities=("chain",))


def test_classes_made_from_a_function_and_a_runnable_are_agents():
    assert issubclass(Shout, Agent) and Shout.__name__ == "ShoutAgent"
    assert Shout.capabilities == ("shout",) and Chain.__name__ == "FakeChainAgent"
    with pytest.raises(TypeError, match="expected an async function"):
        agent_from(lambda payload, ctx: None)


def _run(agent_class: str, capability: str, text: str) -> Any:
    spec = make_spec(pool(capability, agent_class=agent_class, agents_per_host=1))
    host = AgentHost(spec.pools[0].model_dump(mode="json"))
    host.recorder.client = ledger = FakeLedger()
    item = to_item({"capability": capability, "payload": {"text": text}}, {capability})
    asyncio.run(host.run_and_record([item]))
    (o,) = ledger.outcomes
    return o


def test_on_a_host_the_function_and_the_runnable_report_output_and_tokens():
    o = _run("tests.agents.test_adapters:Shout", "shout", "hi")
    assert o.ok, o
    assert (o.to_result().output["loud"], o.input_tokens, o.output_tokens) == ("HI", 1, 3)
    o = _run("tests.agents.test_adapters:Chain", "chain", "abc")
    assert o.ok, o
    assert (o.to_result().output, o.input_tokens, o.output_tokens) == ("cba", 11, 4)


@pytest.mark.ray
def test_live_a_function_agent_and_a_runnable_agent(start_fleet):
    fc = start_fleet(
        make_spec(
            pool("shout", agent_class="tests.agents.test_adapters:Shout", agents_per_host=2),
            pool("chain", agent_class="tests.agents.test_adapters:Chain", agents_per_host=2),
            pool(
                "env",
                agent_class="tests.agents.test_adapters:Greet",
                agents_per_host=1,
                runtime_env={
                    "env_vars": {"FLEET_GREETING": "hello", "GREETER_API_KEY": "k-123"}
                },
            ),
            name="adapters",
            namespace="adapters",
        )
    )
    ids = fc.submit(
        [
            {"capability": "shout", "payload": {"text": "hey"}},
            {"capability": "chain", "payload": {"text": "fleet"}},
            {"capability": "env"},
        ]
    ).accepted
    assert fc.wait(ids, timeout_s=60) == []
    shouted, chained, greeted = fc.results(ids)
    assert greeted.output == "hello"  # the pool's runtime_env reached its hosts
    assert shouted.output["loud"] == "HEY" and shouted.output["agent"] == shouted.agent_id
    assert (chained.output, chained.input_tokens, chained.output_tokens) == ("teelf", 11, 4)
