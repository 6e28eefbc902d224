"""Chaos in the simulator: kill waves, slowdowns and partitions from the scenario.

Every injection is logged in ``Simulation.injections`` with its virtual time, so the
report can measure, per kill wave, the time to replace the agents and the time until
throughput recovered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.sim.engine import PoolRun, Simulation
    from fleet.sim.scenario import SlowdownChaos


def schedule_chaos(sim: Simulation) -> None:
    """Put the scenario's chaos on the event heap (times drawn from the chaos stream)."""
    chaos = sim.scenario.chaos
    rng = sim.rng("chaos")
    for spec in chaos.kills:
        end = spec.start_s if spec.end_s is None else spec.end_s
        times = sorted(rng.uniform(spec.start_s, end) for _ in range(spec.waves))
        pools = [sim.pool_by_name[spec.pool]] if spec.pool else list(sim.pools)
        share = spec.share / spec.waves
        for t in times:
            for p in pools:
                sim.schedule(t, lambda now, p=p, share=share: _kill_wave(sim, p, share, now))
    for spec in chaos.slowdowns:
        p = sim.pool_by_name[spec.pool]
        sim.schedule(spec.start_s, lambda now, p=p, spec=spec: _slowdown(sim, p, spec, now))
    for spec in chaos.partitions:
        p = sim.pool_by_name[spec.pool]

        def cut(now: float, p: PoolRun = p, dur: float = spec.duration_s) -> None:
            sim.log_event("partition", pool=p.name, duration_s=dur)
            sim.injections.append(_injection(sim, "partition", p, 0, now))
            sim.set_partition(p, True, now)
            sim.schedule(now + dur, lambda t: _heal(sim, p, t))

        sim.schedule(spec.start_s, cut)


def _injection(sim: Simulation, kind: str, p: PoolRun, agents: int, now: float) -> dict:
    return {
        "t_s": now,
        "kind": kind,
        "pool": p.name,
        "agents": agents,
        "replaced": 0,
        "not_replaced": 0,
        "replaced_max_s": 0.0,
    }


def _heal(sim: Simulation, p: PoolRun, now: float) -> None:
    sim.log_event("partition_healed", pool=p.name)
    sim.set_partition(p, False, now)


def _kill_wave(sim: Simulation, p: PoolRun, share: float, now: float) -> None:
    n = len(p.active)
    if n == 0:
        return
    k = min(n, max(1, round(share * n)))
    rng = sim.rng(f"chaos/kill/{p.name}/{len(sim.injections)}")
    victims = [p.active[i] for i in rng.sample(range(n), k)]
    idx = len(sim.injections)
    sim.injections.append(_injection(sim, "kill", p, k, now))
    sim.log_event("kill", pool=p.name, agents=k)
    for a in victims:
        sim.kill(a, now, "kill", idx)


def _slowdown(sim: Simulation, p: PoolRun, spec: SlowdownChaos, now: float) -> None:
    n = len(p.active)
    if n == 0:
        return
    k = min(n, max(1, round(spec.share * n)))
    rng = sim.rng(f"chaos/slow/{p.name}/{len(sim.injections)}")
    victims = [(a, a.gen) for a in (p.active[i] for i in rng.sample(range(n), k))]
    for a, _ in victims:
        a.factor *= spec.factor
    sim.injections.append(_injection(sim, "slowdown", p, k, now))
    sim.log_event("slowdown", pool=p.name, agents=k, factor=spec.factor)

    def restore(t: float) -> None:
        for a, gen in victims:
            if a.gen == gen:  # not killed or restarted since (a restart resets the factor)
                a.factor /= spec.factor
        sim.log_event("slowdown_over", pool=p.name)

    sim.schedule(now + spec.duration_s, restore)
