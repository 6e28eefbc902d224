"""The OpenAI-compatible client (``fleet.llm.openai_compat``) against a local fake
provider that enforces its own limits (``tests/llm/fake_provider.py``): replies carry
the provider's token usage and the request its ``max_tokens``; each failure becomes the
reason fleet records (``rate_limited`` with the provider's ``Retry-After``,
``provider_auth``, ``provider_rejected``, ``provider_unreachable``,
``provider_bad_response``); and a host whose pool names the provider gives its agents
the client as ``self.llm``, so README's agent runs as written."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from fleet import Agent, agent_from
from fleet.llm import (
    OpenAICompatible,
    ProviderAuth,
    ProviderBadResponse,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnreachable,
    client_for,
)
from fleet.runtime.host import AgentHost
from fleet.spec import parse_spec
from fleet.spec.llm import LLMSpec
from fleet.task import to_item
from tests.llm.fake_provider import Provider, serve
from tests.utils import FakeLedger, make_spec, pool

ENV = {"FAKE_KEY": "test-key"}


def _client(url: str, model: str = "fake-model", env=ENV, **kw) -> OpenAICompatible:
    return OpenAICompatible(model, url, "FAKE_KEY", environ=env, **kw)


def test_a_reply_carries_the_providers_usage_and_the_request_its_cap():
    provider = Provider(reply_tokens=50)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    with serve(provider) as url:
        c = _client(url)  # one client, one event loop: a host's

        async def calls() -> tuple:
            got = await c.complete("x" * 400, max_tokens=30)
            limits = dict(c.limits)
            return got, limits, await c.chat([{"role": "user", "content": "hi"}], tools=tools)

        got, limits, reply = asyncio.run(calls())
    # The model asked for (the price table's key), whatever dated name answered.
    assert (got.model, got.input_tokens, got.output_tokens) == ("fake-model", 100, 30)
    assert reply.served_model == "fake-model-2026-01-01"
    assert provider.seen_max_tokens == [30, 512]  # the cap asked, then the client's
    assert limits["x-ratelimit-remaining-requests"].isdigit()
    assert reply.tool_calls[0]["function"]["name"] == "lookup"


def test_over_the_providers_limit_is_rate_limited_with_its_retry_after():
    provider = Provider(rpm=60)  # a bucket of 60, refilled at one a second
    with serve(provider) as url:
        c = _client(url)

        async def burst() -> list:
            return await asyncio.gather(
                *(c.complete("hi") for _ in range(70)), return_exceptions=True
            )

        out = asyncio.run(burst())
    limited = [e for e in out if isinstance(e, ProviderRateLimited)]
    # 60 pass at once; of the other 10, those the refill (one a second) has not
    # covered yet are refused, each with the seconds until it would be.
    assert 1 <= len(limited) == provider.refused <= 10
    assert len(out) - len(limited) == provider.calls - provider.refused >= 60
    assert all(e.fleet_reason == "rate_limited" for e in limited)
    assert all(0 < e.retry_after_s <= 1.1 for e in limited), [e.retry_after_s for e in limited]


@pytest.mark.parametrize(
    ("setup", "error", "reason", "needle"),
    [
        ({"env": {}}, ProviderAuth, "provider_auth", "FAKE_KEY is not set"),
        ({"env": {"FAKE_KEY": "wrong"}}, ProviderAuth, "provider_auth", "HTTP 401"),
        ({"model": "nope"}, ProviderRejected, "provider_rejected", "HTTP 404"),
        ({"mode": "no_usage"}, ProviderBadResponse, "provider_bad_response", "no token usage"),
        ({"mode": "overloaded"}, ProviderRateLimited, "rate_limited", "HTTP 503"),
    ],
)
def test_each_provider_failure_has_its_reason(setup, error, reason, needle):
    provider = Provider(mode=setup.get("mode", ""))
    with serve(provider) as url:
        c = _client(url, setup.get("model", "fake-model"), setup.get("env", ENV))
        with pytest.raises(error, match=needle) as info:
            asyncio.run(c.complete("hi"))
    assert info.value.fleet_reason == reason
    assert "test-key" not in str(info.value) and "wrong" not in str(info.value)


def test_an_unreachable_provider_is_provider_unreachable():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = _client(f"http://127.0.0.1:{port}/v1", timeout_s=5)
    with pytest.raises(ProviderUnreachable) as info:
        asyncio.run(c.complete("hi"))
    assert info.value.fleet_reason == "provider_unreachable"


@pytest.mark.parametrize(
    ("llm", "field", "needle"),
    [
        ({"provider": "acme"}, "provider", "'simulated' or 'openai'"),
        ({"provider": "openai", "base_url": "ftp://x"}, "base_url", "should match"),
        ({"api_key_env": "1BAD"}, "api_key_env", "should match"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ],
)
def test_a_bad_llm_section_is_refused_naming_the_field(llm, field, needle):
    with pytest.raises(ValueError, match=rf"pools\.0\.llm\.{field}") as info:
        parse_spec({"pools": [pool("work", llm=llm)]})
    assert needle in str(info.value)


def test_without_a_provider_the_client_is_simulated():
    assert type(client_for(None)).__name__ == "SimulatedLLM"
    assert type(client_for(LLMSpec(time_scale=0.01))).__name__ == "SimulatedLLM"


def _readme_agent() -> type[Agent]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [
        c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "Summarizer" in c
    ]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns["Summarizer"]


def _host(url: str, key_env: str) -> tuple[AgentHost, FakeLedger]:
    spec = make_spec(
        pool(
            "summarize",
            agent_class="tests.llm.test_openai_client:Summarizer",
            agents_per_host=2,
            llm={
                "provider": "openai",
                "base_url": url,
                "model": "fake-model",
                "api_key_env": key_env,
            },
        )
    )
    host = AgentHost(spec.pools[0].model_dump(mode="json"))
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


Summarizer = _readme_agent()  # README's example, as the host imports it


def test_readmes_agent_runs_on_a_host_against_the_provider(monkeypatch):
    monkeypatch.setenv("FLEET_TEST_FAKE_KEY", "test-key")
    provider = Provider(reply_tokens=7)
    item = to_item({"capability": "summarize", "payload": {"text": "y" * 80}}, {"summarize"})
    with serve(provider) as url:
        host, ledger = _host(url, "FLEET_TEST_FAKE_KEY")
        asyncio.run(host.run_and_record([item]))
        bad, bad_ledger = _host(url, "FLEET_TEST_NO_SUCH_KEY")
        report = asyncio.run(bad.run_and_record([item._replace(deliveries=1)]))
        provider.mode = "overloaded"
        slow, _ = _host(url, "FLEET_TEST_FAKE_KEY")
        busy = asyncio.run(slow.run_and_record([item._replace(deliveries=1)]))
    (o,) = ledger.outcomes
    assert o.ok and (o.input_tokens, o.output_tokens) == (20, 7), o
    assert provider.calls == 1  # the host without a key never called (nor the 503s)
    (f,) = bad_outcome = bad_ledger.outcomes  # not retried: a key does not come back
    assert (f.ok, f.reason, report.retry_ids) == (False, "provider_auth", []), bad_outcome
    # An overloaded provider's task is retried, not before its Retry-After (2 s).
    assert busy.retry_ids == [item.id] and busy.retry_delays_s[0] >= 2.0, busy


# --- the reservation as a cap (fleet.llm.caps) ----------------------------------------

PRICE = {"input_usd_per_mtok": 3.0, "output_usd_per_mtok": 7.0}


def test_a_cap_leaves_what_the_reservation_does_not_cover_uncalled():
    from fleet.llm import Cap, CapExceeded
    from fleet.llm.caps import price_of
    from fleet.spec.budgets import ModelPrice

    prices = {"m": ModelPrice.model_validate(PRICE)}
    usd = prices["m"].cost_usd(300, 50)
    cap = Cap.of_grant(350, usd, prices)
    # tokens: 350 - 111; USD: 50 output tokens plus what 189 fewer input tokens leave
    assert cap.max_output("m", 111) == min(239, int((usd - 111 * 3e-6) / 7e-6))
    tokens_only = Cap.of_grant(350, 0.0, prices)  # no USD booked: tokens alone
    # Two calls at once each hold their share: the second gets what the first left.
    first = tokens_only.hold("m", 100, 1_000)
    assert first == 250  # 350 less the input's bound
    with pytest.raises(CapExceeded):  # nothing left while the first call holds it all
        tokens_only.hold("m", 40, 1_000)
    tokens_only.release("m", 100, first, 100, 200)  # it used 300 of its 350
    assert tokens_only.tokens == 50 and tokens_only.max_output("m", 40) == 10
    assert (tokens_only.used_tokens, tokens_only.used_usd) == (
        300,
        prices["m"].cost_usd(100, 200),
    )
    with pytest.raises(CapExceeded, match=r"raise budgets\.task_estimates") as info:
        tokens_only.max_output("m", 50)
    assert info.value.fleet_reason == "budget_exhausted"
    assert Cap.of_grant(0, 0.0, prices).max_output("m", 10**6) is None  # nothing booked
    # A dated name is priced as the longest priced name it starts with.
    assert price_of({"gpt": 1, "gpt-4o": 2}, "gpt-4o-2024-08-06") == 2
    assert price_of({"gpt-4o": 2}, "claude") is None


def _budget_host(
    url: str, input_tokens: int, agent: str = "Summarizer"
) -> tuple[AgentHost, FakeLedger, Any]:
    from fleet.runtime.budget_actor import BudgetBook
    from fleet.runtime.budget_client import BudgetClient
    from tests.runtime.test_budget_live import _BookActor
    from tests.utils import FakeClock

    spec = make_spec(
        pool(
            "summarize",
            agent_class=f"tests.llm.test_openai_client:{agent}",
            agents_per_host=1,
            llm={"provider": "openai", "base_url": url, "model": "fake-model",
                 "api_key_env": "FLEET_TEST_FAKE_KEY"},
        ),
        budgets={
            "prices": {"fake-model": PRICE},
            "task_estimates": {
                "summarize": {"model": "fake-model", "input_tokens": input_tokens,
                              "output_tokens": 50}
            },
            "pools": {"summarize": {"daily_usd": 100}},
        },
    )  # fmt: skip
    book = BudgetBook(spec, FakeClock(1_000_000.0))
    host = AgentHost(
        spec.pools[0].model_dump(mode="json"),
        spec.resilience.model_dump(mode="json"),
        {k: v.model_dump() for k, v in spec.budgets.prices.items()},
    )
    host.budget = BudgetClient(actor=_BookActor(book))
    host.recorder.client = ledger = FakeLedger()
    return host, ledger, book


def test_the_reservation_reaches_the_request_as_max_tokens_and_nothing_overspends(
    monkeypatch,
):
    from fleet.llm import Cap
    from fleet.llm.caps import input_upper_bound
    from fleet.spec.budgets import ModelPrice

    monkeypatch.setenv("FLEET_TEST_FAKE_KEY", "test-key")
    text = "y" * 80
    provider = Provider(reply_tokens=10_000)  # it would answer at any length asked
    item = to_item({"capability": "summarize", "payload": {"text": text}}, {"summarize"})
    with serve(provider) as url:
        host, ledger, book = _budget_host(url, input_tokens=300)
        asyncio.run(host.run_and_record([item]))
        # Real input far above a small estimate: the call is not made at all.
        small, small_ledger, small_book = _budget_host(url, input_tokens=10)
        report = asyncio.run(small.run_and_record([item._replace(deliveries=1)]))
    price = ModelPrice.model_validate(PRICE)
    messages = [{"role": "user", "content": text}]
    expected = Cap.of_grant(350, price.cost_usd(300, 50), {"fake-model": price}).max_output(
        "fake-model", input_upper_bound(messages)
    )
    assert provider.seen_max_tokens == [expected] and expected < 512  # one call, capped
    (o,) = ledger.outcomes
    assert o.ok and o.output_tokens == expected
    assert book.snapshot()["overrun_usd"] == 0
    (f,) = small_ledger.outcomes
    assert (f.ok, f.reason, report.retry_ids) == (False, "budget_exhausted", [])
    assert small_book.snapshot()["overrun_usd"] == 0 and provider.calls == 1


async def ask_twice(payload: Any, ctx: Any) -> Any:
    """Two model calls at once, a plain reply (no tokens reported by the agent)."""
    a, b = await asyncio.gather(
        ctx.llm.complete(payload["text"], max_tokens=20), ctx.llm.complete("z", max_tokens=20)
    )
    return a.text[:3] + b.text[:3]


AskTwice = agent_from(ask_twice, name="AskTwice")


def test_calls_at_once_share_the_cap_and_the_task_is_charged_what_they_used(monkeypatch):
    from fleet.llm.caps import input_upper_bound
    from fleet.spec.budgets import ModelPrice

    monkeypatch.setenv("FLEET_TEST_FAKE_KEY", "test-key")
    provider = Provider(reply_tokens=10_000)
    text = "y" * 40
    item = to_item({"capability": "summarize", "payload": {"text": text}}, {"summarize"})
    with serve(provider) as url:
        host, ledger, book = _budget_host(url, input_tokens=300, agent="AskTwice")
        asyncio.run(host.run_and_record([item]))
    (o,) = ledger.outcomes
    assert o.ok and o.input_tokens == 0, o  # the agent reported nothing itself
    bounds = [input_upper_bound([{"role": "user", "content": t}]) for t in (text, "z")]
    # Each call held its own share of the reservation (350 tokens, and its USD).
    assert provider.seen_max_tokens == [20, 20]
    assert sum(provider.seen_max_tokens) + sum(bounds) <= 350
    # Settled at what the calls used, as the provider reported it, not at $0.
    price = ModelPrice.model_validate(PRICE)
    used_in = sum(max(1, len(t.encode()) // 4) for t in (text, "z"))
    used = price.cost_usd(used_in, sum(provider.seen_max_tokens))
    assert book.snapshot()["pools"]["summarize"]["spend_usd"] == pytest.approx(used)


def test_the_llm_support_example_runs_against_the_endpoint_its_environment_names(
    monkeypatch,
):
    from fleet.runtime.budget_actor import BudgetBook
    from fleet.runtime.budget_client import BudgetClient
    from fleet.spec import load_spec
    from tests.runtime.test_budget_live import _BookActor
    from tests.utils import FakeClock

    example = Path(__file__).resolve().parents[2] / "examples" / "llm-support.yaml"
    monkeypatch.setenv("FLEET_LLM_API_KEY", "test-key")
    provider = Provider(reply_tokens=1_000)
    with serve(provider) as url:
        spec = load_spec(example, {"FLEET_LLM_BASE_URL": url, "FLEET_LLM_MODEL": "fake-model"})
        host = AgentHost(
            spec.pools[0].model_dump(mode="json"),
            spec.resilience.model_dump(mode="json"),
            {k: v.model_dump() for k, v in spec.budgets.prices.items()},
        )
        book = BudgetBook(spec, FakeClock(1_000_000.0))
        host.budget = BudgetClient(actor=_BookActor(book))
        host.recorder.client = ledger = FakeLedger()
        q = {"capability": "support", "payload": {"question": "Where is my order?"}}
        asyncio.run(host.run_and_record([to_item(q, {"support"})]))
    (o,) = ledger.outcomes
    assert o.ok and o.output_tokens == 300, o  # its max_tokens, within its reservation
    assert (
        o.cost_usd
        == pytest.approx(
            spec.budgets.prices["fake-model"].cost_usd(o.input_tokens, o.output_tokens)
        )
        and o.cost_usd > 0
    )
    assert book.snapshot()["overrun_usd"] == 0
