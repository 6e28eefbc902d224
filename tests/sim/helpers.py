"""Scenario builders shared by the simulator tests."""

from __future__ import annotations

import copy
from typing import Any

from fleet.sim import Scenario, parse_scenario


def pool_spec(
    name: str = "work", agents: int = 4, max_agents: int | None = None, **kw: Any
) -> dict[str, Any]:
    """A fleet-spec pool: a fixed size unless ``max_agents`` or ``autoscaling`` say so."""
    autoscaling = kw.pop("autoscaling", None) or {
        "min_agents": agents,
        "max_agents": max_agents or agents,
        "control_interval_s": 1000.0,
    }
    return {
        "name": name,
        "capability": name,
        "agent_class": "fleet.agents.examples:NoopAgent",
        "autoscaling": autoscaling,
        **kw,
    }


def scenario_dict(
    pools: list[dict[str, Any]] | None = None,
    models: dict[str, Any] | None = None,
    workload: list[dict[str, Any]] | None = None,
    fleet: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """A small valid scenario as a mapping; every part can be replaced."""
    pools = pools or [pool_spec()]
    names = [p["name"] for p in pools]
    models = (
        models
        if models is not None
        else {n: {"service": {"kind": "exponential", "mean_s": 1.0}} for n in names}
    )
    workload = workload or [
        {"pool": names[0], "arrivals": {"kind": "poisson", "rate_per_s": 2.0}}
    ]
    data = {
        "name": "test",
        "seed": 1,
        "fleet": {"pools": pools, **(fleet or {})},
        "pools": models,
        "workload": workload,
        "max_tasks": 1000,
    }
    data.update(kw)
    return copy.deepcopy(data)


def scenario(**kw: Any) -> Scenario:
    return parse_scenario(scenario_dict(**kw))


# Nothing fails in the queueing-theory runs and no call comes near the breakers'
# slow-call duration, so breakers could never trip: they are off to keep long runs cheap.
NO_BREAKERS = {"agent_breaker": {"enabled": False}}


def mmc(
    c: int,
    rho: float,
    tasks: int,
    seed: int,
    router: str = "round_robin",
    warmup_s: float = 50.0,
) -> Scenario:
    """M/M/c: Poisson arrivals at rho * c per second, c agents, exponential(1) service,
    one FIFO queue (agents take work only when free). Any router gives the same waits
    here (identical agents, work-conserving); round-robin is the cheapest."""
    return scenario(
        pools=[pool_spec("p", c, routing={"router": router})],
        fleet={"resilience": NO_BREAKERS},
        models={"p": {"service": {"kind": "exponential", "mean_s": 1.0}}},
        workload=[{"pool": "p", "arrivals": {"kind": "poisson", "rate_per_s": rho * c}}],
        max_tasks=tasks,
        seed=seed,
        warmup_s=warmup_s,
        sample_interval_s=1000.0,
    )


def supermarket(
    n: int, d: int, lam: float, tasks: int, seed: int, warmup_s: float = 100.0
) -> Scenario:
    """JSQ(d): n agents with their own FIFO queues; each arrival joins the least loaded
    of d sampled agents (fleet's LeastLoadedRouter), exponential(1) service."""
    return scenario(
        pools=[pool_spec("p", n, routing={"router": "least_loaded", "choices_d": d})],
        fleet={"resilience": {"task_timeout_s": 1e9, **NO_BREAKERS}},
        models={
            "p": {
                "service": {"kind": "exponential", "mean_s": 1.0},
                "agent_queue_limit": 1_000_000,
            }
        },
        workload=[{"pool": "p", "arrivals": {"kind": "poisson", "rate_per_s": lam * n}}],
        max_tasks=tasks,
        seed=seed,
        warmup_s=warmup_s,
        sample_interval_s=1000.0,
    )
