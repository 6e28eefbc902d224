"""Budget benchmark: fairness per priority class and overspend under three load profiles.

The pure ``BudgetPolicy`` runs over one virtual day with a fixed fleet (a fifth high, half
normal, the rest low priority) whose demand is twice the daily budget, so the policy has
to ration. Each agent's tasks are drawn up front (times and actual costs), so its *true*
demand for the day is known; the offline ideal is the max-min fair allocation of the
budget over those demands under the same rules (``fleet.policy.allocation.allocate``:
minimums, priority classes, weights, caps). For each class the benchmark reports Jain's
fairness index of ``spend / ideal`` over its agents (1.0 = every agent got the same
fraction of its fair share) and of raw spend, and, measured from the simulated ledger
(the actual cost of every task that ran), ``overspend_usd``: spend beyond the daily
budget plus spend of any agent beyond its maximum. It must be 0.

Profiles: ``uniform`` (every agent wants the same), ``skewed`` (Pareto-distributed
demand, a few agents want far more), ``bursty`` (on/off agents: short bursts at five
times the mean rate).

``race``: 200 asyncio tasks compete for the last $10 of a budget through the store
interface (``AsyncStoreAdapter``, yielding between calls as a remote store would), each
wanting up to $1: with reserve-then-settle the overspend is 0; a naive check-then-spend
client, for comparison, overspends.

Run: ``fleet bench budgets --json`` or ``python -m fleet.bench.budgets [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
import time
from typing import Any

from fleet.policy.allocation import Claim, Policy, Preemption, allocate
from fleet.policy.budget import (
    AsyncStoreAdapter,
    BudgetPolicy,
    InMemoryBudgetStore,
    Reservation,
    Resource,
    Usage,
    to_units,
)
from fleet.spec.budgets import DAY_S, BudgetsSpec
from fleet.stats import jain_index

NEEDS_RAY = False
SEED = 7
AGENTS = 600
QUICK_AGENTS = 150
OVERLOAD = 2.0  # demand / budget
MEAN_USD_PER_H = 40.0
TASK_USD = (2.0, 10.0)  # the estimate (reservation) range; actual is 50-100% of it
CLASSES = (("high", 0.2, 4.0), ("normal", 0.5, 2.0), ("low", 0.3, 1.0))
PROFILES = ("uniform", "skewed", "bursty")
RACE_TASKS = 200
RACE_LEFT_USD = 10.0
RACE_SEEDS = 5
DAY0 = 20_000 * DAY_S


class _Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _rates(profile: str, n: int, rng: random.Random) -> list[float]:
    """Mean USD per hour wanted by each agent."""
    if profile == "skewed":
        raw = [min(rng.paretovariate(1.3), 50.0) for _ in range(n)]
        scale = MEAN_USD_PER_H * n / sum(raw)
        return [r * scale for r in raw]
    return [MEAN_USD_PER_H] * n


def _stream(
    profile: str, rate_usd_per_h: float, rng: random.Random
) -> list[tuple[float, float, float]]:
    """One agent's tasks over the day: (time, estimate, actual)."""
    mean_task = sum(TASK_USD) / 2 * 0.75
    out = []
    t = 0.0
    on_until = -1.0
    while True:
        if profile == "bursty":
            # On for ~30 min at 5x the rate, off for ~2 h: the same mean rate.
            if t > on_until:
                t += rng.expovariate(1 / 7_200)
                on_until = t + rng.expovariate(1 / 1_800)
            gap = mean_task / (5 * rate_usd_per_h) * 3_600
        else:
            gap = mean_task / rate_usd_per_h * 3_600
        t += rng.expovariate(1 / gap)
        if t >= DAY_S:
            return out
        est = rng.uniform(*TASK_USD)
        out.append((t, est, est * rng.uniform(0.5, 1.0)))


def run_profile(profile: str, n: int, seed: int = SEED) -> dict[str, Any]:
    rng = random.Random(f"{profile}:{seed}")
    names = []
    cls_of = {}
    for cls, share, _ in CLASSES:
        for i in range(round(n * share)):
            a = f"{cls}-{i}"
            names.append(a)
            cls_of[a] = cls
    rates = _rates(profile, len(names), rng)
    streams = {a: _stream(profile, r, rng) for a, r in zip(names, rates)}
    demand = {a: math.fsum(x[2] for x in s) for a, s in streams.items()}
    budget = round(math.fsum(demand.values()) / OVERLOAD)
    per_agent = budget / len(names)
    spec = BudgetsSpec(
        daily_usd=budget,
        per_agent_min_usd=round(0.2 * per_agent, 2),
        per_agent_max_usd=round(4 * per_agent, 2),
        allocation="dynamic",
        preemption="strict",
        priority_classes=[{"name": c, "weight": w} for c, _, w in CLASSES],
        pool_classes={c: c for c, _, _ in CLASSES},
        rebalance_interval_s=300,
    )
    clock = _Clock(DAY0)
    policy = BudgetPolicy(spec, clock)
    for a in names:
        policy.join(a, cls_of[a])

    events: list[tuple[float, int, str, Any]] = []
    seq = 0
    for a, s in streams.items():
        for t, est, actual in s:
            seq += 1
            events.append((DAY0 + t, seq, a, (est, actual)))
    heapq.heapify(events)
    spent = dict.fromkeys(names, 0.0)
    refused = 0
    ran = 0
    t0 = time.perf_counter()
    while events:
        t, _, a, data = heapq.heappop(events)
        clock.t = t
        if a == "~settle":
            r, actual = data
            policy.settle(r, Usage(usd=actual))
            spent[r.agent_id] += actual
            continue
        est, actual = data
        r = policy.reserve(a, Usage(usd=est))
        if isinstance(r, Reservation):
            ran += 1
            seq += 1
            heapq.heappush(events, (t + rng.uniform(30, 300), seq, "~settle", (r, actual)))
        else:
            refused += 1
    wall = time.perf_counter() - t0

    # The offline ideal: the same rules applied once, knowing every agent's demand.
    rank = {c: len(CLASSES) - i for i, (c, _, _) in enumerate(CLASSES)}
    weight = {c: w for c, _, w in CLASSES}
    ideal = allocate(
        budget,
        [
            Claim(
                a,
                min=spec.per_agent_min_usd,
                max=spec.per_agent_max_usd or math.inf,
                weight=weight[cls_of[a]],
                demand=demand[a],
                priority=rank[cls_of[a]],
            )
            for a in names
        ],
        Policy.DYNAMIC,
        Preemption.STRICT,
    ).shares
    total = math.fsum(spent.values())
    cap = spec.per_agent_max_usd or math.inf
    overspend = max(0.0, total - budget) + math.fsum(max(0.0, s - cap) for s in spent.values())
    classes = {}
    for c, _, _ in CLASSES:
        members = [a for a in names if cls_of[a] == c]
        ratios = [min(spent[a] / ideal[a], 1.0) if ideal[a] > 0 else 1.0 for a in members]
        classes[c] = {
            "agents": len(members),
            "demand_usd": round(math.fsum(demand[a] for a in members), 2),
            "ideal_usd": round(math.fsum(ideal[a] for a in members), 2),
            "spend_usd": round(math.fsum(spent[a] for a in members), 2),
            "jain_index": round(jain_index(ratios), 4),
            "jain_index_raw_spend": round(jain_index(spent[a] for a in members), 4),
            "mean_share_of_ideal": round(sum(ratios) / len(ratios), 4),
        }
    return {
        "agents": len(names),
        "budget_usd": budget,
        "demand_usd": round(math.fsum(demand.values()), 2),
        "spend_usd": round(total, 2),
        "overspend_usd": round(overspend, 6),
        "overrun_usd": policy.overrun_usd,
        "tasks_ran": ran,
        "tasks_refused": refused,
        "classes": classes,
        "sim_wall_s": round(wall, 3),
    }


async def _race(seed: int, reserve_settle: bool) -> float:
    """USD spent beyond the last $10 when 200 tasks race for it."""
    store = InMemoryBudgetStore()
    limit = to_units(Resource.USD, RACE_LEFT_USD)
    store.set_limits({"fleet": limit})
    astore = AsyncStoreAdapter(store)
    rng = random.Random(seed)
    ledger: list[int] = []
    entry = ("fleet", 0)
    tally = ("tally", 0)  # unlimited: where the naive client records its usage

    async def task(i: int) -> None:
        est = to_units(Resource.USD, 1.0)
        if reserve_settle:
            if await astore.try_reserve(f"t{i}", {entry: est}) is not None:
                return
        elif limit - (await astore.counters([tally]))[tally].used < est:
            return
        for _ in range(rng.randint(0, 4)):
            await asyncio.sleep(0)  # the task runs; others interleave
        actual = rng.randint(est // 2, est)
        ledger.append(actual)
        if reserve_settle:
            await astore.settle(f"t{i}", {entry: actual})
        else:
            await astore.try_reserve(f"t{i}", {tally: 0})
            await astore.settle(f"t{i}", {tally: actual})

    await asyncio.gather(*(task(i) for i in range(RACE_TASKS)))
    return max(0.0, (sum(ledger) - limit) / 1e6)


def run_race() -> dict[str, Any]:
    guarded = [asyncio.run(_race(SEED + s, True)) for s in range(RACE_SEEDS)]
    naive = [asyncio.run(_race(SEED + s, False)) for s in range(RACE_SEEDS)]
    return {
        "tasks": RACE_TASKS,
        "left_usd": RACE_LEFT_USD,
        "trials": RACE_SEEDS,
        "reserve_settle_overspend_usd": max(guarded),
        "naive_check_then_spend_overspend_usd": round(max(naive), 6),
    }


def run(quick: bool = False) -> dict[str, Any]:
    n = QUICK_AGENTS if quick else AGENTS
    t0 = time.perf_counter()
    profiles = {p: run_profile(p, n) for p in PROFILES}
    race = run_race()
    overspend = max(
        [p["overspend_usd"] for p in profiles.values()]
        + [race["reserve_settle_overspend_usd"]]
    )
    return {
        "profiles": profiles,
        "jain_index": {
            p: {c: v["jain_index"] for c, v in r["classes"].items()}
            for p, r in profiles.items()
        },
        "overspend_usd": overspend,
        "race": race,
        "lost": 0,
        "wall_s": round(time.perf_counter() - t0, 2),
        "command": "fleet bench budgets --json" + (" --quick" if quick else ""),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = run(quick=args.quick)
    print(json.dumps(out, sort_keys=True) if args.json else json.dumps(out, indent=2))
    return 0 if out["overspend_usd"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
