"""Answering from a pool's cache while its degrade rule holds (``degrade.from_cache``),
at an entry point's ``AdmissionGate``, without Ray: which tasks are asked about (a
``cache_key``, a pool whose rule answers from its cache, per tenant), what an answer
is (the cached output as the new task's own outcome, degraded with the rule, no run
and no cost), that it is recorded before it is returned, and that an answer older
than the rule's ``cache_max_age_s`` is not used. The live path is in
``test_degrade_live.py``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from fleet.policy.admission import LEVELS, AdmissionRule, PoolLoad
from fleet.policy.degrade import DEGRADED
from fleet.runtime.admission_gate import AdmissionGate
from fleet.task import Outcome, cache_key_of, to_item
from tests.utils import FakeClock, make_spec, pool

RULE = "work.predicted_wait_s >= 1"
MAX_AGE_S = 60.0


class _Ledger:
    """Stands in for ``LedgerClient``: cached answers by key, and what was recorded."""

    def __init__(self, answers: dict[Any, Outcome]):
        self.answers = answers
        self.asked: list[Any] = []
        self.recorded: list[Outcome] = []

    def cached(
        self, keys: list[Any], max_age_s: float, timeout_s: float | None = None
    ) -> list[Outcome | None]:
        self.asked += keys
        return [self.answers.get(k) for k in keys]

    def record(self, outcomes: list[Outcome]) -> int:
        self.recorded += outcomes
        return len(outcomes)

    async def cached_async(self, keys: list[Any], max_age_s: float) -> list[Outcome | None]:
        return self.cached(keys, max_age_s)

    async def record_async(self, outcomes: list[Outcome]) -> int:
        return self.record(outcomes)


def _gate(clock: FakeClock, cache: bool = True) -> AdmissionGate:
    spec = make_spec(
        pool("work", degrade={"from_cache": True, "predicted_wait_s": 1.0}),
        pool("other"),
    )
    gate = AdmissionGate(spec, lambda: None, clock)
    rule = AdmissionRule.of(spec.pools[0].admission, spec.budgets)
    load = PoolLoad(rule, clock(), (0,) * LEVELS, None, (0.0,) * LEVELS, True, 4)
    degraded = dataclasses.replace(
        load, degraded=RULE, cache_max_age_s=MAX_AGE_S if cache else None
    )
    gate.policy.update({"work": degraded, "other": load})
    return gate


def _cached(task_id: str, output: bytes, finished: float) -> Outcome:
    return Outcome(
        task_id, True, output, None, None, "work-0", "work", 1, finished - 1, finished - 1,
        finished, 10, 20, 0.5,
    )  # fmt: skip


def _items(clock: FakeClock) -> list[Any]:
    tasks = [
        {"capability": "work", "id": "a", "cache_key": "faq-1"},
        {"capability": "work", "id": "b", "cache_key": "faq-old"},
        {"capability": "work", "id": "c"},  # no key: never asked
        {"capability": "other", "id": "d", "cache_key": "faq-1"},  # not degraded
        {"capability": "work", "id": "e", "cache_key": "faq-none"},
        {"capability": "work", "id": "f", "cache_key": "faq-1"},  # its id is the client's
    ]
    return [to_item(t, {"work", "other"}, now_unix_s=clock()) for t in tasks]


MADE_UP = {"a", "b", "c", "d", "e"}  # ids fleet made up at this call (not "f")
KEY_1, KEY_OLD, KEY_NONE = "\x1ffaq-1", "\x1ffaq-old", "\x1ffaq-none"  # no tenant


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_recent_answer_to_the_same_key_answers_a_new_task(path):
    clock = FakeClock(1_000_000.0)
    now = clock()
    ledger = _Ledger(
        {
            ("work", KEY_1): _cached("t-1", b'{"answer":1}', now - 5),
            ("work", KEY_OLD): _cached("t-0", b'{"answer":0}', now - 2 * MAX_AGE_S),
        }
    )
    gate = _gate(clock)
    items = _items(clock)
    if path == "sync":
        got = gate.answer_from_cache(items, ledger, MADE_UP)
    else:
        got = asyncio.run(gate.answer_from_cache_async(items, ledger, MADE_UP))
    # A task the client named may be queued already: it takes the ordinary path.
    assert ledger.asked == [("work", KEY_1), ("work", KEY_OLD), ("work", KEY_NONE)]
    assert list(got) == ["a"] and ledger.recorded == [got["a"]]
    r = got["a"].to_result()
    assert (r.task_id, r.output, r.pool, r.degraded_rule, r.deliveries) == (
        "a",
        {"answer": 1},
        "work",
        RULE,
        0,
    )
    assert (r.cost_usd, r.input_tokens, r.output_tokens) == (0.0, 0, 0)
    counts = gate.policy.take_counts()
    assert sum(n for (p, _, why, _), n in counts.items() if why == DEGRADED) == 1


def test_no_cache_rule_or_a_tenants_key_never_reaches_another_tenant():
    clock = FakeClock(1_000_000.0)
    ledger = _Ledger({("work", KEY_1): _cached("t-1", b"1", clock() - 1)})
    assert _gate(clock, cache=False).answer_from_cache(_items(clock), ledger, MADE_UP) == {}
    assert ledger.asked == []  # no rule answering from a cache: no call at all
    acme = to_item(
        {"capability": "work", "id": "x", "cache_key": "faq-1"}, {"work"}, tenant="acme"
    )
    paid = to_item(
        {"capability": "work", "id": "y", "cache_key": "faq-1", "payload": {"tenant": "b"}},
        {"work"},
    )
    gate = _gate(clock)
    assert gate.answer_from_cache([acme, paid], ledger, {acme.id, paid.id}) == {}
    # Each tenant's own key only: the ingress's by its id, the others' by its payload.
    assert ledger.asked == [("work", "acme\x1ffaq-1"), ("work", "payload:b\x1ffaq-1")]
    assert cache_key_of(acme) == "acme\x1ffaq-1"


def test_a_failed_lookup_or_a_failed_answer_is_a_miss():
    clock = FakeClock(1_000_000.0)

    class Down(_Ledger):
        def cached(self, keys, max_age_s, timeout_s=None):
            raise TimeoutError("a ledger shard is restarting")

    assert _gate(clock).answer_from_cache(_items(clock), Down({}), MADE_UP) == {}
    failed = _cached("t-1", None, clock() - 1)._replace(ok=False, reason="error")
    ledger = _Ledger({("work", KEY_1): failed})
    assert _gate(clock).answer_from_cache(_items(clock), ledger, MADE_UP) == {}
