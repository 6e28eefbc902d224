"""Budget enforcement on a virtual clock: spec checks, the store, reserve/settle, quotas,
windows, alerts, preemption, a 200-task race, and the shipped $50,000-a-day example."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.policy.budget import (
    REASON_EXHAUSTED,
    AsyncStoreAdapter,
    BudgetPolicy,
    InMemoryBudgetStore,
    Refusal,
    Reservation,
    Resource,
    Usage,
    to_units,
)
from fleet.spec import SpecError, load_spec, parse_spec
from fleet.spec.budgets import DAY_S, BudgetsSpec, ModelPrice, check_budget_covers
from tests.utils import FakeClock, pool

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "budget-50k.yaml"
DAY0 = 20_000 * DAY_S  # a virtual clock starting at midnight


def budgets(**kw) -> BudgetsSpec:
    return BudgetsSpec(**kw)


# --- the spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,path,needle",
    [
        (
            {"daily_usd": 1000, "per_agent_min_usd": 600, "per_agent_max_usd": 500},
            "budgets",
            "per_agent_min_usd (600) must be <= per_agent_max_usd (500)",
        ),
        (
            {"prices": {"m": {"input_usd_per_mtok": -1, "output_usd_per_mtok": 1}}},
            "budgets.prices.m.input_usd_per_mtok",
            "price -1.0 is negative",
        ),
        ({"daily_usd": -5}, "budgets.daily_usd", "-5.0 is negative"),
        ({"per_agent_min_usd": 5}, "budgets", "needs daily_usd"),
        (
            {"daily_usd": 40, "per_agent_min_usd": 50},
            "budgets",
            "per_agent_min_usd 50 x 1 agent = 50 > daily_usd 40",
        ),
        ({"pool_classes": {"a": "gold"}}, "budgets", "unknown priority class 'gold'"),
        ({"alert_thresholds": [0.9, 0.5]}, "budgets", "must be increasing"),
        ({"alert_thresholds": [1.5]}, "budgets.alert_thresholds.0", "outside (0, 1]"),
        (
            {"tenants": {"acme": {"daily_tokens": -1}}},
            "budgets.tenants.acme.daily_tokens",
            "greater than or equal to 0",
        ),
        ({"allocation": "greedy"}, "budgets.allocation", "'dynamic'"),
    ],
)
def test_bad_budgets_are_rejected_at_load_with_the_field_path(bad, path, needle):
    with pytest.raises(SpecError) as exc:
        parse_spec({"pools": [pool("a")], "budgets": bad})
    errors = dict(exc.value.errors)
    assert path in errors, errors
    assert needle in errors[path]


def test_minimum_the_total_cannot_cover_at_max_agents_is_rejected_with_the_arithmetic():
    spec = budgets(daily_usd=50_000, per_agent_min_usd=50, per_agent_max_usd=500)
    pools = [
        pool("a", autoscaling={"max_agents": 1500}),
        pool("b", autoscaling={"max_agents": 500}),
    ]
    with pytest.raises(ValueError) as exc:
        check_budget_covers(spec, pools)
    assert (
        "budgets.per_agent_min_usd 50 x max_agents 2000 = 100000 > budgets.daily_usd 50000"
    ) in str(exc.value)
    assert "a 1500, b 500" in str(exc.value)
    check_budget_covers(spec.model_dump(), [pool("a", autoscaling={"max_agents": 1000})])
    with pytest.raises(ValueError, match=r"budgets\.pool_classes\.nope: no pool named 'nope'"):
        check_budget_covers(budgets(pool_classes={"nope": "default"}), [pool("a")])


def test_the_shipped_example_loads_and_covers_its_minimums():
    spec = load_spec(EXAMPLE)
    b = spec.budgets
    assert (b.daily_usd, b.per_agent_min_usd, b.per_agent_max_usd) == (50_000, 50, 500)
    assert b.class_names == ["high", "normal", "low"]
    assert sum(p.autoscaling.min_agents for p in spec.pools) == 10
    assert sum(p.autoscaling.max_agents for p in spec.pools) == 1_000
    check_budget_covers(b, spec.pools)


def test_model_price_still_costs_results():
    price = ModelPrice(input_usd_per_mtok=2.5, output_usd_per_mtok=10)
    assert price.cost_usd(1_000_000, 100_000) == pytest.approx(3.5)
    assert Usage.of_llm(price, 1000, 500) == Usage(usd=pytest.approx(0.0075), tokens=1500)
    with pytest.raises(ValidationError):
        budgets(per_agent={"daily_usd": 5}, daily_usd=100)


# --- the store (one parametrized fixture, so other backends run the same tests) -------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        yield InMemoryBudgetStore()
        return
    # The budget actor's durable store: the same semantics, and on teardown what it
    # committed reloads to the same counters and open reservations.
    from fleet.runtime.budget_store import BudgetDatabase, SqliteBudgetStore

    durable = SqliteBudgetStore(BudgetDatabase(tmp_path / "budget.sqlite3"))
    yield durable
    durable.commit()
    again = SqliteBudgetStore(BudgetDatabase(tmp_path / "budget.sqlite3"))
    entries = durable.entries() | again.entries()
    assert {e: v[1:] for e, v in durable.counters(entries).items()} == {
        e: v[1:] for e, v in again.counters(entries).items()
    }
    assert again.reservations == durable.reservations


def test_store_reserves_all_or_nothing_and_settles_once(store):
    store.set_limits({"a": 100, "b": 50})
    assert store.try_reserve("r1", {("a", 0): 60, ("b", 0): 40}) is None
    refused = store.try_reserve("r2", {("a", 0): 30, ("b", 0): 20})
    assert refused is not None and refused.entry == ("b", 0) and refused.reserved == 40
    assert store.counters([("a", 0)])[("a", 0)].reserved == 60, "nothing booked on refusal"
    assert store.settle("r1", {("a", 0): 10, ("b", 0): 45}) == {("b", 0): 5}
    assert store.settle("r1", {("a", 0): 10}) is None, "a second settle counts nothing"
    view = store.counters([("a", 0), ("b", 0)])
    assert view[("a", 0)] == (100, 10, 0) and view[("b", 0)] == (50, 45, 0)
    assert store.try_reserve("r3", {("a", 1): 100}) is None, "a new window starts at 0"
    assert store.release("r3") and not store.release("r3")
    key = "agent:x:usd:daily"
    store.settle("old", {}) if store.try_reserve("old", {(key, 4): 5}) is None else None
    assert store.try_reserve("open", {(key, 3): 5}) is None
    store.settle("new", {}) if store.try_reserve("new", {(key, 5): 5}) is None else None
    assert store.expire({"daily": 5}) == 1, "old and settled: dropped; open: kept"
    assert store.counters([(key, 3)])[(key, 3)].reserved == 5


def test_store_unknown_limit_means_unlimited_and_negative_amounts_are_errors(store):
    assert store.try_reserve("r", {("free", 0): 10**12}) is None
    with pytest.raises(ValueError, match="negative amount"):
        store.try_reserve("s", {("free", 0): -1})


def test_200_tasks_racing_for_the_last_budget_never_overspend(store):
    """200 asyncio tasks reserve, work (yielding in between) and settle through the async
    store interface; a naive check-then-spend client overspends the same budget."""
    limit = to_units(Resource.USD, 10.0)  # $10 left; each task wants up to $1
    store.set_limits({"fleet": limit})
    astore = AsyncStoreAdapter(store)
    rng = random.Random(5)
    ledger: list[int] = []

    async def guarded(i: int) -> None:
        est = to_units(Resource.USD, 1.0)
        if await astore.try_reserve(f"t{i}", {("fleet", 0): est}) is not None:
            return
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        actual = rng.randint(est // 2, est)
        ledger.append(actual)
        await astore.settle(f"t{i}", {("fleet", 0): actual})

    async def naive(i: int) -> None:
        # Reads what is left, works, then records its usage: the check and the spend are
        # two store calls, and other tasks run in between.
        est = to_units(Resource.USD, 1.0)
        used = (await astore.counters([("naive-used", 0)]))[("naive-used", 0)].used
        if limit - used < est:
            return
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        actual = rng.randint(est // 2, est)
        naive_ledger.append(actual)
        await astore.try_reserve(f"n{i}", {("naive-used", 0): 0})
        await astore.settle(f"n{i}", {("naive-used", 0): actual})

    async def race(fn) -> None:
        await asyncio.gather(*(fn(i) for i in range(200)))

    asyncio.run(race(guarded))
    assert sum(ledger) <= limit
    assert store.counters([("fleet", 0)])[("fleet", 0)].used == sum(ledger)
    assert len(ledger) >= 10, "the budget was used, not refused wholesale"
    naive_ledger: list[int] = []
    asyncio.run(race(naive))
    assert sum(naive_ledger) > limit, "the race is real: check-then-spend overspends"


# --- reserve and settle ----------------------------------------------------------------------


def make_policy(clock: FakeClock, **kw) -> BudgetPolicy:
    return BudgetPolicy(budgets(**kw), clock)


def test_reserve_settle_refunds_unused_and_refuses_with_a_reason():
    clock = FakeClock(DAY0)
    p = make_policy(clock, daily_usd=10, per_agent_max_usd=6)
    p.join("a", "pool")
    p.join("b", "pool")
    r = p.reserve("a", Usage(usd=4))
    assert isinstance(r, Reservation)
    assert p.limit_usd("a") == 5, "two new agents share $10 equally"
    assert p.remaining_usd("a") == pytest.approx(1)
    s = p.settle(r, Usage(usd=2))
    assert s.refunded_usd == pytest.approx(2) and s.overrun_usd == 0
    assert p.remaining_usd("a") == pytest.approx(3)
    refusal = p.reserve("a", Usage(usd=3.5))
    assert isinstance(refusal, Refusal) and refusal.reason == REASON_EXHAUSTED
    assert refusal.scope == "agent" and refusal.retry_elsewhere
    assert "agent:a:usd:daily: used 2 + reserved 0 + this task 3.5 > limit 5" in refusal.detail
    assert refusal.retry_after_s == pytest.approx(DAY_S)
    assert p.settle(r, Usage(usd=2)).duplicate, "settling twice counts once"
    assert p.spend_usd("fleet") == pytest.approx(2)


def test_fleet_exhaustion_refuses_everyone_and_retry_elsewhere_is_false():
    clock = FakeClock(DAY0)
    p = make_policy(clock, daily_usd=10)
    for a in ("a", "b"):
        p.join(a, "pool")
    p.settle(p.reserve("a", Usage(usd=5)), Usage(usd=5))
    p.settle(p.reserve("b", Usage(usd=5)), Usage(usd=5))
    refusal = p.reserve("b", Usage(usd=0.01))
    assert isinstance(refusal, Refusal) and not refusal.retry_elsewhere
    assert refusal.scope in ("fleet", "agent")
    assert p.remaining_usd() == 0 and not p.can_take_work("a", 0.01)


def test_release_gives_everything_back_and_overruns_are_recorded_not_hidden():
    clock = FakeClock(DAY0)
    p = make_policy(clock, daily_usd=10)
    p.join("a", "pool")
    r = p.reserve("a", Usage(usd=4))
    assert p.release(r) and p.remaining_usd("a") == pytest.approx(10)
    r = p.reserve("a", Usage(usd=1))
    s = p.settle(r, Usage(usd=1.5))
    assert s.overrun_usd == pytest.approx(0.5) and p.overrun_usd == pytest.approx(0.5)
    assert p.spend_usd("agent:a") == pytest.approx(1.5)


def test_pool_tenant_token_and_cpu_quotas_over_hourly_windows():
    clock = FakeClock(DAY0)
    p = make_policy(
        clock,
        pools={"p": {"hourly_tokens": 1000}},
        tenants={"acme": {"daily_cpu_s": 10}},
        per_agent={"hourly_usd": 3},
    )
    p.join("a", "p")
    p.join("b", "q")
    r = p.reserve("a", Usage(tokens=800), tenant="acme")
    p.settle(r, Usage(tokens=700, cpu_s=9.5))
    over = p.reserve("a", Usage(tokens=400))
    assert isinstance(over, Refusal) and over.key == "pool:p:tokens:hourly"
    assert not over.retry_elsewhere
    assert isinstance(p.reserve("b", Usage(tokens=400)), Reservation), "other pool: no quota"
    cpu = p.reserve("b", Usage(cpu_s=1), tenant="acme")
    assert isinstance(cpu, Refusal) and cpu.key == "tenant:acme:cpu_s:daily"
    assert isinstance(p.reserve("b", Usage(usd=4)), Refusal)  # per-agent hourly USD
    clock.advance(3_600)  # a new hour: the hourly quotas start again, the daily do not
    assert isinstance(p.reserve("a", Usage(tokens=400)), Reservation)
    assert isinstance(p.reserve("b", Usage(cpu_s=1), tenant="acme"), Refusal)


def test_daily_window_rolls_over_at_midnight():
    clock = FakeClock(DAY0 + DAY_S - 10)
    p = make_policy(clock, daily_usd=5)
    p.join("a", "pool")
    p.settle(p.reserve("a", Usage(usd=5)), Usage(usd=5))
    assert isinstance(p.reserve("a", Usage(usd=1)), Refusal)
    clock.advance(10)
    assert isinstance(p.reserve("a", Usage(usd=5)), Reservation)
    assert p.spend_usd("fleet") == 0, "today's spend starts from zero"


def test_alerts_fire_once_per_threshold_per_window():
    clock = FakeClock(DAY0)
    p = make_policy(clock, daily_usd=100, alert_thresholds=[0.5, 0.8])
    p.join("a", "pool")
    for usd in (30, 25, 1, 30):
        p.settle(p.reserve("a", Usage(usd=usd)), Usage(usd=usd))
    fleet = [a for a in p.poll_alerts() if a.key.startswith("fleet")]
    assert [(a.threshold, a.used) for a in fleet] == [(0.5, 55), (0.8, 86)]
    assert "fleet:all:usd:daily: used 55 of 100 (55% >= 50%)" == fleet[0].message
    assert p.poll_alerts() == []


def test_state_taken_as_changes_restores_a_policy_after_a_restart():
    """``take_changes`` reports what a storage layer must keep; ``restore`` on a new
    policy over the same counters continues where the old one stopped."""
    clock = FakeClock(DAY0)
    spec = budgets(daily_usd=100, alert_thresholds=[0.5], tenants={"t": {"hourly_usd": 50}})
    store = InMemoryBudgetStore()
    p = BudgetPolicy(spec, clock, store)
    p.record_changes()
    p.join("a", "pool")
    r = p.reserve("a", Usage(usd=10))
    r1 = p.reserve("a", Usage(usd=30), tenant="t")
    p.settle(r1, Usage(usd=30, tokens=7))
    changes = p.take_changes()
    assert changes.stats["fleet"] == (30, 7, 0.0, 1) and changes.stats["tenant:t"][0] == 30
    assert {a.key for a, polled in changes.alerts if not polled} == {"tenant:t:usd:hourly"}
    assert p.take_changes().stats == {}, "changes are reported once"

    q = BudgetPolicy(spec, clock, store)  # the restart: same counters, new policy
    q.restore(changes, spent_today=["a"])
    q.record_changes()
    assert q.spend_usd("fleet") == 30 and q.spend_usd("tenant:t") == 30
    assert [a.key for a in q.poll_alerts()] == ["tenant:t:usd:hourly"]
    assert q.settle(r, Usage(usd=10)).duplicate is False, "a pre-restart reservation"
    assert q.remaining_usd() == pytest.approx(60)
    q.join("a", "pool")  # agents come back as they reserve
    q.settle(q.reserve("a", Usage(usd=5), tenant="t"), Usage(usd=5))
    assert q.poll_alerts() == [], "the tenant's alert already fired this hour"
    r2 = q.reserve("a", Usage(usd=1))
    assert isinstance(r2, Reservation) and r2.id not in (r.id, r1.id), (
        "reservation ids continue after the restored sequence"
    )
    clock.advance(DAY_S)
    q.rebalance()
    new_day = q.take_changes()
    assert new_day.new_day and new_day.stats == {}


def test_burn_rate_and_snapshot():
    clock = FakeClock(DAY0)
    p = make_policy(clock, daily_usd=1000, burn_rate_window_s=3600)
    p.join("a", "pool")
    for _ in range(12):
        clock.advance(300)
        p.settle(p.reserve("a", Usage(usd=2)), Usage(usd=2))
    assert p.burn_rate_usd_per_h("fleet") == pytest.approx(24, rel=0.15)
    snap = p.snapshot()
    assert snap["fleet"]["used_usd"] == pytest.approx(24)
    assert snap["pools"]["pool"]["tasks"] == 12
    assert 24 < snap["top_agents"]["a"]["limit_usd"] < 1000, "projected demand, not all"


def test_a_departed_agent_keeps_counting_and_its_share_goes_to_the_others():
    clock = FakeClock(DAY0)
    p = make_policy(clock, daily_usd=100, allocation="equal")
    for a in ("a", "b"):
        p.join(a, "pool")
    p.settle(p.reserve("a", Usage(usd=30)), Usage(usd=30))
    p.leave("a")
    p.rebalance()
    assert p.limit_usd("b") == pytest.approx(70)
    with pytest.raises(KeyError, match="join first"):
        p.reserve("a", Usage(usd=1))


def test_overload_preempts_low_priority_first():
    clock = FakeClock(DAY0)
    p = make_policy(
        clock,
        daily_usd=1000,
        per_agent_min_usd=50,
        per_agent_max_usd=500,
        priority_classes=[{"name": "high"}, {"name": "low"}],
        pool_classes={"hp": "high", "lp": "low"},
    )
    for i in range(2):
        p.join(f"h{i}", "hp")
        p.join(f"l{i}", "lp")
    p.rebalance()
    # Minimums first ($200), then the $800 surplus to the high class (up to $500 each).
    assert [p.limit_usd(f"h{i}") for i in range(2)] == [450, 450]
    assert [p.limit_usd(f"l{i}") for i in range(2)] == [50, 50]
    snap = p.snapshot()["classes"]
    assert snap["low"]["preempted"] == 2 and snap["high"]["preempted"] == 0
    assert snap["high"]["short"] == 2, "high wants more too, but got the surplus"


def test_growth_reserve_keeps_minimums_for_agents_yet_to_join():
    clock = FakeClock(DAY0)
    spec = budgets(
        daily_usd=1000,
        per_agent_min_usd=100,
        per_agent_max_usd=1000,
        priority_classes=[{"name": "high", "reserve_for_growth": True}, {"name": "low"}],
        pool_classes={"hp": "high"},
    )
    p = BudgetPolicy(spec, clock, max_agents_by_pool={"hp": 4, "lp": 6})
    p.join("h0", "hp")
    p.join("l0", "lp")
    p.rebalance()
    # 3 absent high agents x $100 held back, l0 keeps its minimum, h0 gets the rest.
    assert p.limit_usd("h0") == 600 and p.limit_usd("l0") == 100
    p.settle(p.reserve("h0", Usage(usd=600)), Usage(usd=600))
    for i in (1, 2, 3):
        p.join(f"h{i}", "hp")
    p.rebalance()
    # The latecomers get the $100 each that was held for them, although h0 spent early.
    assert [p.limit_usd(f"h{i}") for i in (1, 2, 3)] == [100, 100, 100]
    assert p.limit_usd("l0") == 100
    without = BudgetPolicy(
        spec.model_copy(
            update={
                "priority_classes": [
                    spec.priority_classes[0].model_copy(update={"reserve_for_growth": False}),
                    spec.priority_classes[1],
                ]
            }
        ),
        FakeClock(DAY0),
        max_agents_by_pool={"hp": 4, "lp": 6},
    )
    without.join("h0", "hp")
    without.join("l0", "lp")
    without.rebalance()
    assert without.limit_usd("h0") == 900, "no reserve: the first agent may take it all"


# --- the shipped example under a load that exceeds it ---------------------------------


class LoadGenerator:
    """A fleet growing from 10 to 1,000 agents over 12 virtual hours (every 5 minutes),
    driving the budget policy built from the shipped spec with far more demand than
    $50,000 a day: each agent wants about $60 an hour, one in ten about $600 an hour.
    Tasks reserve $4-16, use half to all of it and run 1 to 5 minutes, so many
    reservations are outstanding at once. An agent refused by its own budget stops taking
    work for half an hour; one refused by the fleet's, for an hour."""

    HEAVY_EVERY = 10
    MAX_TASK_USD = 16.0

    def __init__(self, seed: int = 11):
        spec = load_spec(EXAMPLE)
        self.clock = FakeClock(DAY0)
        self.policy = BudgetPolicy.for_fleet(spec, self.clock)
        self.rebalance_s = spec.budgets.rebalance_interval_s
        self.rng = random.Random(seed)
        self.pools = {
            p.name: (p.autoscaling.min_agents, p.autoscaling.max_agents) for p in spec.pools
        }
        self.present: dict[str, list[str]] = {p: [] for p in self.pools}
        self.spent: dict[str, float] = {}  # the ledger: actual USD per agent
        self.cls: dict[str, str] = {}
        self.gap_s: dict[str, float] = {}
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.refusals: dict[str, int] = {"high": 0, "normal": 0, "low": 0}
        self.first_preempted: dict[str, float] = {}
        self.high_below_min = 0
        self.max_committed = 0.0  # settled + outstanding reservations, at any moment
        self.outstanding = 0.0

    def push(self, t: float, kind: str, data: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def grow(self, t: float) -> None:
        frac = min(1.0, (t - DAY0) / (12 * 3600))
        for name, (lo, hi) in self.pools.items():
            want = round(lo + (hi - lo) * frac)
            while len(self.present[name]) < want:
                i = len(self.present[name])
                a = f"{name}-{i}"
                self.present[name].append(a)
                self.policy.join(a, name)
                self.cls[a] = self.policy.class_of(a)
                self.spent[a] = 0.0
                self.gap_s[a] = 45.0 if i % self.HEAVY_EVERY == 0 else 450.0
                self.push(t + self.rng.uniform(0, self.gap_s[a]), "task", a)

    def run(self, hours: float = 24.0) -> None:
        end = DAY0 + hours * 3600
        next_grow = DAY0
        while True:
            t_next = self.events[0][0] if self.events else end
            if next_grow <= t_next and next_grow < end:
                self.clock.t = next_grow
                self.grow(next_grow)
                self.policy.rebalance()
                self.check()
                next_grow += 300
                continue
            if t_next >= end:
                break
            t, _, kind, data = heapq.heappop(self.events)
            self.clock.t = t
            if kind == "task":
                self.task(t, data)
            else:
                r, est = data
                actual = est * self.rng.uniform(0.5, 1.0)
                self.policy.settle(r, Usage(usd=actual))
                self.spent[r.agent_id] += actual
                self.outstanding -= est

    def task(self, t: float, a: str) -> None:
        est = self.rng.uniform(4.0, self.MAX_TASK_USD)
        r = self.policy.reserve(a, Usage(usd=est))
        if isinstance(r, Reservation):
            self.outstanding += est
            self.max_committed = max(
                self.max_committed, self.outstanding + math.fsum(self.spent.values())
            )
            self.push(t + self.rng.uniform(60, 300), "done", (r, est))
            self.push(t + self.rng.expovariate(1 / self.gap_s[a]), "task", a)
        else:
            self.refusals[self.cls[a]] += 1
            wait = 1800.0 if r.retry_elsewhere else 3600.0
            self.push(t + wait * self.rng.uniform(1.0, 1.2), "task", a)

    def check(self) -> None:
        alloc = self.policy.allocation
        assert alloc is not None
        self.high_below_min += sum(1 for a in alloc.below_min if self.cls.get(a) == "high")
        for c, row in self.policy.classes().items():
            if row["preempted"]:
                self.first_preempted.setdefault(c, self.clock.t)


@pytest.fixture(scope="module")
def load_run() -> LoadGenerator:
    gen = LoadGenerator()
    gen.run()
    return gen


def test_example_total_spend_never_passes_50k(load_run):
    total = math.fsum(load_run.spent.values())
    assert total <= 50_000
    assert load_run.max_committed <= 50_000 + 1e-6, "not even with reservations"
    assert total >= 0.85 * 50_000, "the load exceeded the budget and used it"
    assert load_run.policy.overrun_usd == 0
    assert sum(len(v) for v in load_run.present.values()) == 1_000


def test_example_no_agent_passes_500(load_run):
    assert max(load_run.spent.values()) <= 500
    heavy_early = [load_run.spent[f"{p}-0"] for p in load_run.pools]
    assert max(heavy_early) >= 500 - LoadGenerator.MAX_TASK_USD, "the cap was reached"


def test_example_high_priority_keeps_its_share_low_is_preempted_first(load_run):
    by_class: dict[str, list[float]] = {"high": [], "normal": [], "low": []}
    for a, usd in load_run.spent.items():
        by_class[load_run.cls[a]].append(usd)
    mean = {c: sum(v) / len(v) for c, v in by_class.items()}
    assert mean["high"] > mean["normal"] > mean["low"], mean
    assert load_run.high_below_min == 0, "no high agent's allocation ever fell below $50"
    # Every high agent spent its minimum, give or take one task that no longer fit.
    assert min(by_class["high"]) >= 50 - LoadGenerator.MAX_TASK_USD
    first = load_run.first_preempted
    assert first["low"] <= first.get("normal", math.inf) <= first.get("high", math.inf)
    assert first["low"] < first.get("high", math.inf)
    refused_share = {c: load_run.refusals[c] / len(v) for c, v in by_class.items()}
    assert refused_share["low"] > refused_share["high"], refused_share
