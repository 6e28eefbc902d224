"""The simulated side of a live-versus-simulated comparison.

``simulate_fleet`` runs a fleet spec, exactly as the live runtime would get it, under
Poisson arrivals, and returns figures shaped like ``fleet demo --json`` (submitted,
completed, failed, lost, throughput, latency percentiles, agents) plus the agents over
time, so the live run of the same spec and rate can be set beside it.

Service times come from the agent classes the spec names, where the simulator knows
them: the example LLM agents follow ``fleet.agents.llm.LatencyModel`` (scaled by their
``time_scale``), the no-op agent takes no time. Anything else needs ``service``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fleet.agents.llm import LatencyModel
from fleet.sim.engine import simulate
from fleet.sim.scenario import parse_scenario
from fleet.spec import FleetSpec

_LLM_AGENTS = ("fleet.agents.examples:SupportAgent", "fleet.agents.examples:CheckoutAgent")
_NOOP_AGENTS = ("fleet.agents.examples:NoopAgent",)


def default_pool_model(pool: Any, prices: Mapping[str, Any]) -> dict[str, Any] | None:
    """The simulator's model of a pool's agent class, or None when it does not know it."""
    kw = pool.agent_kwargs
    if pool.agent_class in _NOOP_AGENTS:
        return {"service": {"kind": "constant", "value_s": 0.0}}
    if pool.agent_class in _LLM_AGENTS:
        lat = LatencyModel(time_scale=float(kw.get("time_scale", 1.0)))
        model: dict[str, Any] = {
            "service": {"kind": "llm", **dataclasses.asdict(lat)},
            "failures": {"task_failure_prob": float(kw.get("fail_rate", 0.0))},
        }
        name = kw.get("model", "sim-small")
        if name in prices:
            model["tokens"] = {
                "model": name,
                # the example agents' prompts are about 80 characters: ~20 tokens
                "input_tokens": {"kind": "constant", "value": 20},
                "output_tokens": {
                    "kind": "lognormal",
                    "median": lat.output_tokens_median,
                    "sigma": lat.output_tokens_sigma,
                },
            }
        return model
    return None


def simulate_fleet(
    spec: FleetSpec,
    rate_per_s: float | Mapping[str, float],
    duration_s: float,
    *,
    service: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    sample_interval_s: float = 0.5,
    dispatch_overhead_s: float = 0.0,
) -> dict[str, Any]:
    """Simulate ``spec`` under Poisson arrivals for ``duration_s`` virtual seconds.

    ``rate_per_s``: tasks per second for every pool, or a mapping pool name -> rate
    (pools left out get none). ``service``: pool name -> a pool model mapping (as under
    a scenario's ``pools:``, e.g. ``{"service": {"kind": "exponential", "mean_s": 0.1}}``),
    overriding the default for that pool's agent class. ``dispatch_overhead_s`` is the
    live per-call overhead to model, if known. Returns demo-shaped figures and, under
    ``report``, the full simulation report.
    """
    rates = (
        {p.name: float(rate_per_s) for p in spec.pools}
        if not isinstance(rate_per_s, Mapping)
        else dict(rate_per_s)
    )
    prices = spec.budgets.prices
    pools: dict[str, Any] = {}
    for p in spec.pools:
        model = (
            dict(service[p.name])
            if service and p.name in service
            else default_pool_model(p, prices)
        )
        if model is None:
            if rates.get(p.name, 0) > 0:
                raise ValueError(
                    f"pool {p.name!r}: the simulator has no model of agent class "
                    f"{p.agent_class!r}; pass service={{{p.name!r}: {{...}}}}"
                )
            continue
        model.setdefault("dispatch_overhead_s", dispatch_overhead_s)
        pools[p.name] = model
    workload = [
        {"pool": name, "arrivals": {"kind": "poisson", "rate_per_s": r}}
        for name, r in rates.items()
        if r > 0
    ]
    scenario = parse_scenario(
        {
            "name": f"{spec.name}-simulated",
            "seed": seed,
            "fleet": spec,
            "pools": pools,
            "workload": workload,
            "duration_s": duration_s,
            "sample_interval_s": sample_interval_s,
        }
    )
    report = simulate(scenario)
    agents = {
        name: {"t_s": s["t_s"], "agents": s["target"], "serving": s["serving"]}
        for name, s in report["series"].items()
    }
    serving = [n for s in report["series"].values() for n in s["serving"]]
    return {
        "simulated": True,
        "submitted": report["submitted"],
        "completed": report["completed"],
        "failed": report["failed"],
        "lost": report["lost"],
        "throughput_tasks_per_s": report["throughput_per_s"]["mean"],
        "latency_s": {k: report["latency_s"][k] for k in ("p50", "p95", "p99")},
        "agents": {"min": min(serving, default=0), "max": report["agents_max"]},
        "agents_over_time": agents,
        "report": report,
    }
