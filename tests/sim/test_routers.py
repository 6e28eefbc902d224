"""Every router of the spec in the simulator, through the host core the runtime runs.

Each scenario runs the pool's real router (``HostCore`` places every task, with its type
and affinity key for the task-aware routers, and feeds outcomes back), and shows the
router's effect on where tasks went, seen through a component's ``on_outcome`` hook.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest

from fleet.sim import Simulation
from fleet.sim.components import Component
from fleet.spec.routing import RouterName

from .helpers import pool_spec, scenario

QUIET = {"agent_breaker": {"enabled": False}, "retry": {"max_attempts": 1}}


class WhoRan(Component):
    """Records the agent of every execution, with the task's type and key."""

    name = "who_ran"

    def __init__(self) -> None:
        self.runs: list[tuple[int, str, bool]] = []  # (task, agent, ok)
        self.sim: Any = None

    def attach(self, sim: Any) -> None:
        self.sim = sim

    def on_outcome(self, sim, agent, tid, ok, service_s, now_s):
        self.runs.append((tid, agent.id, ok))

    def kind(self, tid: int) -> str | None:
        return self.sim.kinds[self.sim.task_kinds[tid]]

    def key(self, tid: int) -> int:
        return self.sim.task_keys[tid]


def _run(router: str, agents: int = 10, routing: dict[str, Any] | None = None, **kw: Any):
    model = kw.pop("model", {})
    stream = kw.pop("stream", {})
    sc = scenario(
        pools=[
            pool_spec(
                "work",
                agents,
                routing={"router": router, **(routing or {})},
                concurrency_per_agent=kw.pop("concurrency", 1),
            )
        ],
        models={"work": {"service": {"kind": "exponential", "mean_s": 1.0}, **model}},
        workload=[
            {"pool": "work", "arrivals": {"kind": "poisson", "rate_per_s": 3.0}, **stream}
        ],
        fleet={"resilience": QUIET},
        max_tasks=kw.pop("tasks", 3000),
        **kw,
    )
    who = WhoRan()
    sim = Simulation(sc, components=[who]).run()
    report = sim.report()
    assert report["lost"] == 0 and report["completed"] + report["failed"] == sim.submitted
    return sim, report, who


@pytest.mark.parametrize("router", [r.value for r in RouterName])
def test_every_router_runs_in_the_simulator(router):
    # The task-aware routers too (capacity and success_rate used to crash the engine).
    _, _, who = _run(router, tasks=600)
    assert len(who.runs) == 600
    used = Counter(agent for _, agent, _ in who.runs)
    assert len(used) >= 8, f"{router} used only {len(used)} of 10 agents"


def test_round_robin_spreads_evenly():
    _, _, who = _run(
        "round_robin", tasks=2000, model={"service": {"kind": "constant", "value_s": 0.1}}
    )
    counts = Counter(agent for _, agent, _ in who.runs)
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1


SPECIALIZED = {
    "model": {"experts": {"fraud": 0.3, "refund": 0.3}},
    # Light load (0.5 Erlang per type), so an expert is free for nearly every task: the
    # fallback to a generalist is for when none is.
    "stream": {
        "task_types": {"fraud": 1.0, "refund": 1.0},
        "arrivals": {"kind": "poisson", "rate_per_s": 1.0},
    },
}


def test_specialization_sends_typed_tasks_to_their_experts():
    sim, _, who = _run("specialization", **SPECIALIZED)
    experts = {a.id: a.expertise for a in sim.pools[0].agents()}
    kinds = Counter(k for e in experts.values() for k in e)
    assert kinds["fraud"] >= 2 and kinds["refund"] >= 2, kinds
    typed = [(who.kind(t), agent) for t, agent, _ in who.runs]
    to_expert = sum(1 for kind, agent in typed if kind in experts[agent])
    assert to_expert / len(typed) >= 0.90, to_expert / len(typed)
    # The same load with least-loaded routing ignores expertise.
    sim2, _, who2 = _run("least_loaded", **SPECIALIZED)
    experts2 = {a.id: a.expertise for a in sim2.pools[0].agents()}
    blind = sum(1 for t, agent, _ in who2.runs if who2.kind(t) in experts2[agent])
    assert blind / len(who2.runs) < 0.5


def test_affinity_keeps_a_key_on_one_agent_while_the_pool_is_stable():
    _, _, who = _run(
        "affinity",
        concurrency=8,
        routing={"affinity": {"load_factor": 8.0}},
        stream={"affinity_keys": 40},
    )
    by_key: dict[int, Counter[str]] = defaultdict(Counter)
    for t, agent, _ in who.runs:
        by_key[who.key(t)][agent] += 1
    sticky = sum(c.most_common(1)[0][1] for c in by_key.values())
    assert len(by_key) == 40
    assert sticky / len(who.runs) >= 0.99, sticky / len(who.runs)
    owners = {c.most_common(1)[0][0] for c in by_key.values()}
    assert len(owners) >= 6, "keys spread over the agents, not all on one"


def test_success_rate_starves_a_failing_agent():
    kw = {
        "model": {"failures": {"bad_agent_share": 0.15, "bad_agent_failure_prob": 1.0}},
        # Light enough load that a good agent is nearly always free: the router's
        # fallback (any free agent when no good one is) stays rare.
        "stream": {"arrivals": {"kind": "poisson", "rate_per_s": 1.5}},
        "tasks": 3000,
    }
    # A failing agent is excluded after min_calls calls in the window and tried again
    # once they age out: it gets about min_calls tasks per window.
    routing = {"success_rate": {"min_calls": 3, "window_s": 300.0}}
    sim, _, who = _run("success_rate", routing=routing, **kw)
    bad = {a.id for a in sim.pools[0].agents() if a.fail_p == 1.0}
    assert bad, "the scenario must have a failing agent"
    late = who.runs[len(who.runs) // 3 :]  # once the router has seen enough outcomes
    share = sum(1 for _, agent, _ in late if agent in bad) / len(late)
    fair = len(bad) / 10
    assert share < fair / 4, (share, fair)
    # Without the router's feedback the failing agents get their fair share.
    sim2, _, who2 = _run("least_loaded", **kw)
    bad2 = {a.id for a in sim2.pools[0].agents() if a.fail_p == 1.0}
    late2 = who2.runs[len(who2.runs) // 3 :]
    assert sum(1 for _, agent, _ in late2 if agent in bad2) / len(late2) > fair / 2
