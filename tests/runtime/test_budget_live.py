"""Budgets enforced in the runtime: the budget actor, the host's reserve/settle path.

First without Ray: the budget actor's book (leases, settlement, snapshot) on a virtual
clock, and a host whose budget calls go to an in-process book (one reserve and one
settle call per batch, shared budgets fail tasks with ``budget_exhausted``, an agent out
of its own budget is parked and its tasks go to other agents or back to the queue).
Then live: 200 logical agents racing for the last of a pool's budget overspend by $0,
measured from the ledger, and the spend shows in status and metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from typing import Any

import pytest
import ray

from fleet.observability import scrape
from fleet.runtime.budget_actor import BudgetBook
from fleet.runtime.budget_client import BudgetClient, Grant
from fleet.runtime.host import REASON_BUDGET_EXHAUSTED, AgentHost
from fleet.runtime.names import Names
from fleet.spec.budgets import BudgetsSpec
from fleet.task import Item, to_item
from tests.utils import FakeClock, FakeLedger, eventually, make_spec, pool

PRICES = {"test-model": {"input_usd_per_mtok": 3.0, "output_usd_per_mtok": 7.0}}
TASK_USD = 0.01  # 1000 input + 1000 output tokens of test-model
_ids = itertools.count()


def _spec(agents: int = 10, hosts: int = 1, **budgets: Any):
    return make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:PricedAgent",
            agents_per_host=agents // hosts,
            autoscaling={"min_agents": agents, "max_agents": agents},
            agent_kwargs={"delay_s": 0.01},
        ),
        budgets={
            "prices": PRICES,
            "task_estimates": {
                "work": {"model": "test-model", "input_tokens": 1000, "output_tokens": 1000}
            },
            **budgets,
        },
    )


def _items(n: int, deliveries: int = 1, **payload: Any) -> list[Item]:
    return [
        to_item(
            {"capability": "work", "payload": {"i": next(_ids), **payload}}, {"work"}
        )._replace(deliveries=deliveries)
        for _ in range(n)
    ]


class _Remote:
    def __init__(self, fn: Any, calls: Counter[str], name: str):
        self._fn, self._calls, self._name = fn, calls, name

    async def remote(self, *args: Any) -> Any:
        self._calls[self._name] += 1
        await asyncio.sleep(0)  # a hop: other tasks run while the call is in flight
        return self._fn(*args)


class _BookActor:
    """Stands in for the budget actor's handle: calls go to an in-process book."""

    def __init__(self, book: BudgetBook):
        self.calls: Counter[str] = Counter()
        self.reserve_batch = _Remote(book.reserve_batch, self.calls, "reserve")
        self.settle_batch = _Remote(book.settle_batch, self.calls, "settle")


def _host(spec, book: BudgetBook) -> tuple[AgentHost, FakeLedger, _BookActor]:
    p = spec.pools[0]
    host = AgentHost(
        p.model_dump(mode="json"),
        spec.resilience.model_dump(mode="json"),
        {k: v.model_dump() for k, v in spec.budgets.prices.items()},
    )
    actor = _BookActor(book)
    host.budget = BudgetClient(actor=actor)
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger, actor


# --- spec ---------------------------------------------------------------------------


def test_estimate_names_a_priced_model_and_budgets_are_enforced_only_when_set():
    with pytest.raises(
        ValueError, match=r"task_estimates.work.model: no price for model 'gpt'"
    ):
        BudgetsSpec.model_validate({"task_estimates": {"work": {"model": "gpt"}}})
    assert not BudgetsSpec().enforced
    assert not BudgetsSpec.model_validate({"prices": PRICES}).enforced
    assert BudgetsSpec.model_validate({"pools": {"work": {"daily_usd": 1}}}).enforced
    spec = _spec()
    assert spec.budgets.estimate_for("work") == pytest.approx((TASK_USD, 2000, 0.0))
    with pytest.raises(ValueError, match=r"budgets\.task_estimates\.nope: no pool named"):
        _spec(task_estimates={"nope": {"usd": 1}})


# --- the book (the actor's logic) ----------------------------------------------------


def test_book_settles_expired_leases_at_their_estimate_and_ignores_late_settles():
    clock = FakeClock(1_000_000.0)
    spec = _spec(pools={"work": {"daily_usd": 3 * TASK_USD}})
    book = BudgetBook(spec, clock)
    grants = [Grant(*g) for g in book.reserve_batch([("h/0", "work", None)] * 4)]
    assert [g.reservation_id is not None for g in grants] == [True, True, True, False]
    assert grants[3].scope == "pool" and not grants[3].retry_elsewhere
    # One task settles at half its estimate, giving back room for nothing more than
    # half a task; the other two belong to a host that dies.
    assert book.settle_batch([(grants[0].reservation_id, TASK_USD / 2, 1000, 0.0)]) == 1
    assert Grant(*book.reserve_batch([("h/1", "work", None)])[0]).reservation_id is None
    clock.advance(spec.resilience.task_timeout_s + spec.budgets.reservation_grace_s - 1)
    assert book.sweep() == 0
    clock.advance(2)
    assert book.sweep() == 2
    snap = book.snapshot()
    assert snap["open_reservations"] == 0 and snap["expired_reservations"] == 2
    assert snap["pools"]["work"]["spend_usd"] == pytest.approx(2.5 * TASK_USD)
    # A settle arriving after expiry does not count twice.
    assert book.settle_batch([(grants[1].reservation_id, 0.0, 0, 0.0)]) == 0
    assert book.snapshot()["late_settles"] == 1
    assert book.snapshot()["pools"]["work"]["spend_usd"] == pytest.approx(2.5 * TASK_USD)


def test_snapshot_feeds_status_lines_and_prometheus_metrics():
    from fleet.cli.status import _budget_lines
    from fleet.observability.metrics import MemorySink
    from fleet.runtime.control_metrics import ControlMetrics

    clock = FakeClock(1_000_000.0)
    spec = _spec(pools={"work": {"daily_usd": 4 * TASK_USD}}, alert_thresholds=[0.5])
    book = BudgetBook(spec, clock)
    grants = [
        Grant(*g) for g in book.reserve_batch([("h/0", "work", "acme"), ("h/1", "work", None)])
    ]
    clock.advance(60)
    book.settle_batch([(g.reservation_id, TASK_USD, 2000, 0.0) for g in grants])
    snap = book.snapshot()
    assert snap["tenants"]["acme"]["spend_usd"] == pytest.approx(TASK_USD)
    sink = MemorySink()
    ControlMetrics(spec, sink, resumed=False).budgets(snap)
    g = sink.gauges
    work = (("fleet", spec.name), ("name", "work"), ("scope", "pool"))
    assert g[("fleet_budget_spend_usd", work)] == pytest.approx(2 * TASK_USD)
    assert g[("fleet_budget_burn_usd_per_hour", work)] > 0
    # acme is in neither budgets.tenants nor observability.metric_tenants: no series.
    assert not [t for _, t in g if ("name", "acme") in t]
    lines = "\n".join(_budget_lines(snap))
    assert "pool   work" in lines and "$0.0200" in lines and "tenant acme" in lines
    assert "ALERT budget: pool:work:usd:daily: used 0.02 of 0.04 (50% >= 50%)" in lines
    # The pool's daily limit and what is left of it are exported too.
    assert g.get(("fleet_budget_limit_usd", work)) == pytest.approx(4 * TASK_USD)
    assert g.get(("fleet_budget_remaining_usd", work)) == pytest.approx(2 * TASK_USD)


# --- the host with budgets ------------------------------------------------------------


def test_host_reserves_and_settles_once_per_batch_and_never_overspends_a_shared_budget():
    clock = FakeClock(1_000_000.0)
    book = BudgetBook(_spec(pools={"work": {"daily_usd": 7 * TASK_USD}}), clock)
    host, ledger, actor = _host(_spec(), book)
    report = asyncio.run(host.run_and_record(_items(25)))
    assert report.recorded == 25 and report.retry_ids == []
    ok = [o for o in ledger.outcomes if o.ok]
    refused = [o for o in ledger.outcomes if not o.ok]
    assert len(ok) == 7
    assert {o.reason for o in refused} == {REASON_BUDGET_EXHAUSTED}
    assert "pool:work:usd:daily" in refused[0].error
    assert math.fsum(o.cost_usd for o in ok) <= 7 * TASK_USD + 1e-12
    # 10 agents: the first 10 tasks share a call, the rest wait for a slot and are
    # reserved as slots free up; every call is batched, never one per task.
    assert actor.calls["reserve"] < 25 and actor.calls["settle"] == 1
    snap = book.snapshot()
    assert snap["open_reservations"] == 0
    assert snap["pools"]["work"]["spend_usd"] == pytest.approx(7 * TASK_USD)
    assert sum(a["tasks"] for a in snap["top_agents"].values()) == 7


def test_agent_out_of_its_own_budget_is_parked_and_its_tasks_go_elsewhere_or_back():
    clock = FakeClock(1_000_000.0)
    spec = _spec(agents=3, per_agent={"daily_usd": 2 * TASK_USD})
    book = BudgetBook(spec, clock)
    host, ledger, _ = _host(spec, book)
    report = asyncio.run(host.run_and_record(_items(10)))
    ok = [o for o in ledger.outcomes if o.ok]
    # Each of the 3 agents runs 2 tasks; the other 4 go back to the queue (later, or
    # to another host): nothing is failed for an agent's own budget, nothing lost.
    assert len(ok) == 6 and Counter(o.agent_id for o in ok) == dict.fromkeys(
        [a.id for a in host.core.agents], 2
    )
    assert report.recorded == 6 and len(report.retry_ids) == 4
    assert all(d > 0 for d in report.retry_delays_s)
    assert book.snapshot()["refused_tasks"]["agent"] >= 3  # each agent once, at least
    # On its last delivery a task no agent here may run fails with budget_exhausted.
    host2, ledger2, _ = _host(spec, book)
    last = spec.resilience.max_deliveries - 1
    for a2, a in zip(host2.core.agents, host.core.agents):
        a2.id = a.id  # the same (exhausted) agents
    report2 = asyncio.run(host2.run_and_record(_items(2, deliveries=last)))
    assert report2.retry_ids == [] and report2.recorded == 2
    assert {o.reason for o in ledger2.outcomes} == {REASON_BUDGET_EXHAUSTED}


def test_cpu_quotas_are_charged_each_agents_own_cpu_even_when_preempted():
    # Agents share the host's thread: each task is charged the CPU of its own coroutine
    # steps (fleet.runtime.cpu_meter). Sleepers about nothing, a computing agent what it
    # computed, a preempted one what it computed before the cut (its tokens and USD,
    # which its agent reports only in its reply, at their estimate).
    clock = FakeClock(1_000_000.0)
    spec = _spec(agents=4, pools={"work": {"daily_cpu_s": 1_000}})
    book = BudgetBook(spec, clock)
    host, ledger, _ = _host(spec, book)
    spinner, cut = _items(1, spin_s=0.1), _items(1, spin_s=5.0)
    sleepers = _items(2, sleep_s=0.2)

    async def run() -> Any:
        batch = asyncio.ensure_future(host.run_and_record(spinner + sleepers + cut))
        await asyncio.sleep(0.5)  # the spinner is done; the long one spins on
        (cur,) = [b for it, b in host._work.values() if it.id == cut[0].id]
        assert host.preempt(cur, {cut[0].id}) == 1
        return await batch

    cpu0 = time.process_time()
    report = asyncio.run(run())
    used = time.process_time() - cpu0
    assert report.recorded == 3 and report.retry_ids == [cut[0].id]
    assert report.retry_delays_s[0] < 0  # handed back as preempted, not recorded
    ran_on = {o.task_id: o.agent_id for o in ledger.outcomes}
    assert all(o.ok for o in ledger.outcomes) and len(ran_on) == 3
    snap = book.snapshot()
    by_agent = {a: v["cpu_s"] for a, v in snap["top_agents"].items()}
    assert all(by_agent[ran_on[it.id]] < 0.02 for it in sleepers), by_agent
    assert 0.1 <= by_agent[ran_on[spinner[0].id]] < 0.15, by_agent
    (cut_agent,) = set(by_agent) - set(ran_on.values())
    assert 0.01 < by_agent[cut_agent] < 1.0, by_agent  # it ran, cut short of its 5 s
    total = snap["pools"]["work"]["cpu_s"]
    assert total == pytest.approx(sum(by_agent.values())) and total <= used
    assert snap["pools"]["work"]["spend_usd"] == pytest.approx(4 * TASK_USD)


def test_host_without_budgets_never_reserves():
    spec = make_spec(
        pool("work", agent_class="fleet.agents.testing:PricedAgent", agents_per_host=4)
    )
    assert not spec.budgets.enforced
    host = AgentHost(spec.pools[0].model_dump(mode="json"))
    assert host.budget is None


# --- live ---------------------------------------------------------------------------


@pytest.mark.ray
def test_200_agents_racing_for_the_last_budget_overspend_by_zero(start_fleet):
    covered = 60  # the pool's daily budget covers exactly this many tasks
    budget = covered * TASK_USD
    spec = _spec(
        agents=200, hosts=2, pools={"work": {"daily_usd": budget}}, alert_thresholds=[0.5, 0.9]
    )
    fc = start_fleet(spec)
    # First most of the budget goes, then 600 tasks race for the last 10 tasks' worth.
    first = fc.submit(
        [
            {"capability": "work", "payload": {"i": -i, "tenant": "t0"}}
            for i in range(1, covered - 10 + 1)
        ]
    ).accepted
    fc.wait(first, timeout_s=120)
    assert fc.summary(first)["completed"] == covered - 10
    tasks = [
        {"capability": "work", "payload": {"i": i, "tenant": f"t{i % 4}"}} for i in range(600)
    ]
    ids = first + fc.submit(tasks).accepted
    fc.wait(ids, timeout_s=120)
    summary = fc.summary(ids)
    results = fc.results(ids)
    completed = [r for r in results if r is not None and r.status.value == "completed"]
    spent = math.fsum(r.cost_usd for r in completed)
    day_windows = len({int(r.finished_unix_s // 86_400) for r in results if r is not None})
    print(
        f"\nrace: {len(completed)} completed, spent ${spent:.4f} of ${budget:.2f}, "
        f"overspend ${max(0.0, spent - budget * day_windows):.4f}, "
        f"{summary['failure_reasons']}"
    )
    assert summary["lost"] == 0 and summary["recorded"] == len(ids)
    assert spent <= budget * day_windows + 1e-9  # overspend exactly $0
    assert len(completed) >= covered  # settlement returned nothing: all of it was used
    assert set(summary["failure_reasons"]) == {REASON_BUDGET_EXHAUSTED}
    assert summary["completed"] + summary["failure_reasons"][REASON_BUDGET_EXHAUSTED] == len(
        ids
    )
    agents = {r.agent_id for r in completed}
    assert len(agents) > 1
    budget_actor = ray.get_actor(Names(spec.name).budget, namespace=spec.namespace)
    snap = ray.get(budget_actor.snapshot.remote())
    print(
        f"race: {len(agents)} agents on {len({a.rsplit('/', 1)[0] for a in agents})} "
        f"host(s) completed tasks; {snap['reserved_total']} reservations granted, "
        f"refused {snap['refused_tasks']}"
    )
    assert snap["open_reservations"] == 0 and snap["overrun_usd"] == 0.0
    assert snap["pools"]["work"]["spend_usd"] == pytest.approx(spent)
    # status and Prometheus show the spend, burn rate and alerts.
    status = fc.status()
    b = status["budgets"]
    assert b["pools"]["work"]["spend_usd"] == pytest.approx(spent)
    assert b["pools"]["work"]["burn_usd_per_h"] > 0
    assert sum(t["spend_usd"] for t in b["tenants"].values()) == pytest.approx(spent)
    assert any("pool:work:usd:daily" in a for a in b["alerts"])

    # The controller exports what the budget actor reports each tick (~1 s to arrive).
    def spend_exported() -> str:
        text = fc.metrics_text()
        got = scrape.total(
            text, "ray_fleet_budget_spend_usd", scope="pool", name="work", fleet=fc.spec.name
        )
        assert got == pytest.approx(spent), got
        return text

    text = eventually(spend_exported, 15, 0.5, what="the pool's spend exported")
    assert 'name="work"' in text
    assert (
        scrape.total(
            text, "ray_fleet_budget_burn_usd_per_hour", scope="pool", fleet=fc.spec.name
        )
        > 0
    )
