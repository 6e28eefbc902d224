"""Chaos benchmark: a long no-op run while hosts die, an agent hangs, latency is
injected, the pool is partitioned and the CPU is saturated; every task accounted for.

Reports what ``fleet.chaos.chaos_run`` measures: the injection log, ``lost`` and
``recorded_twice`` (both must be 0), ``duplicate_executions``, each kill's
kill-to-replacement time and ``max_recovery_s`` (the longest time until throughput,
counted per second from the ledger's finish timestamps, is back to 90% of its level in
the 5 s before the kill). Figures only: nothing is asserted here.
"""

from __future__ import annotations

from typing import Any

from fleet.chaos import ChaosPlan, chaos_run, chaotic_agent_kwargs
from fleet.spec import FleetSpec, parse_spec

FLEET = "chaos-bench"
NAMESPACE = "fleet-bench-chaos"
POOL = "chaos"
HOSTS = 10
AGENTS_PER_HOST = 10
TASK_TIMEOUT_S = 5.0
FULL_TASKS = 100_000
QUICK_TASKS = 20_000
SEED = 6


def bench_spec(
    hosts: int = HOSTS,
    agents_per_host: int = AGENTS_PER_HOST,
    fleet: str = FLEET,
    namespace: str = NAMESPACE,
) -> FleetSpec:
    """One pool of ``ChaoticAgent`` no-op agents on a fixed number of hosts."""
    agents = hosts * agents_per_host
    return parse_spec(
        {
            "name": fleet,
            "namespace": namespace,
            "resilience": {"task_timeout_s": TASK_TIMEOUT_S},
            "queues": {"storage": {"backend": "memory"}},  # host chaos, not queue durability
            "pools": [
                {
                    "name": POOL,
                    "capability": POOL,
                    "agent_class": "fleet.agents.chaotic:ChaoticAgent",
                    "agent_kwargs": chaotic_agent_kwargs(fleet, namespace),
                    "agents_per_host": agents_per_host,
                    "cpus_per_host": 0,
                    "autoscaling": {"min_agents": agents, "max_agents": agents},
                }
            ],
        }
    )


def bench_plan(quick: bool, seed: int = SEED) -> ChaosPlan:
    """Kill 10% of the hosts every 3-6 s; hang one agent; slow 10% of the agents by
    50 ms; partition the pool for 2 s; burn two cores for 3 s."""
    return ChaosPlan(
        pool=POOL,
        seed=seed,
        duration_s=600.0,
        kill_share=0.1,
        kill_start_s=4.0,
        kill_interval_min_s=3.0,
        kill_interval_max_s=6.0,
        max_kill_waves=8 if quick else 30,
        max_hosts_killed=HOSTS * 3,
        hang_agents=1,
        hang_at_s=1.0,
        hang_duration_s=15.0,
        latency_share=0.1,
        latency_s=0.05,
        latency_at_s=2.0,
        latency_duration_s=20.0,
        partition_at_s=10.0 if quick else 25.0,
        partition_duration_s=2.0,
        cpu_burn_workers=2,
        cpu_burn_at_s=6.0 if quick else 15.0,
        cpu_burn_duration_s=3.0,
    )


def run(
    quick: bool = False, tasks: int | None = None, seed: int = SEED, progress: Any = None
) -> dict[str, Any]:
    """Start the bench fleet, run the chaos plan over ``tasks`` tasks, tear it down."""
    from fleet.runtime.client import FleetClient

    n = tasks if tasks is not None else (QUICK_TASKS if quick else FULL_TASKS)
    spec = bench_spec()
    fc = FleetClient.start(spec)
    try:
        out = chaos_run(fc, n, bench_plan(quick, seed), progress=progress)
    finally:
        fc.shutdown()
    out.pop("_held_task_ids", None)
    return {
        "hosts": HOSTS,
        "agents_per_host": AGENTS_PER_HOST,
        "task_timeout_s": TASK_TIMEOUT_S,
        **out,
    }
