"""fleet's series stay bounded whatever the payloads say: 10,000 distinct tenants in
payloads, 500 agents and 3 host replacements make no more series than
``max_series(spec, hosts_ever=5, shards)`` on Ray's own metrics endpoint (per-process
labels included: each host that ever lived counts), and the tenant label takes at most
the configured tenants plus ``other`` and ``none``. Live, on the session cluster."""

from __future__ import annotations

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from fleet.chaos import _replica_id, pool_replicas, replica_states
from fleet.observability.metrics import EXPORTED_PREFIX, NO_TENANT, OTHER_TENANT, max_series
from fleet.observability.scrape import fetch, metrics_endpoints
from tests.utils import eventually, make_spec, pool

# A minute or so on two cores: in `make test-slow`, which CI runs after `make test`.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

FLEET, NS, POOL = "cardfleet", "fleet-card", "cardwork"
AGENTS, HOSTS, TASKS, REPLACEMENTS = 500, 2, 10_000, 3
CONFIGURED = "acme"  # the one tenant with a label value of its own


def _spec():
    return make_spec(
        pool(
            POOL,
            agents_per_host=AGENTS // HOSTS,
            autoscaling={"min_agents": AGENTS, "max_agents": AGENTS},
        ),
        name=FLEET,
        namespace=NS,
        observability={"metric_tenants": [CONFIGURED]},
    )


def _ours(labels: dict[str, str]) -> bool:
    """A series of this test's fleet (every fleet series carries its fleet's name)."""
    return labels.get("fleet") == FLEET


def _series(session: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for ep in metrics_endpoints():
        for fam in text_string_to_metric_families(fetch(ep)):
            for s in fam.samples:
                if (
                    s.name.startswith(EXPORTED_PREFIX + "fleet_")
                    and s.labels.get("SessionName") == session
                    and _ours(s.labels)
                ):
                    out.append((s.name, s.labels, s.value))
    return out


def _counted(session: str) -> float:
    return sum(v for n, _, v in _series(session) if n == "ray_fleet_tasks_total")


def _replace_hosts(n: int) -> None:
    """Kill ``n`` running hosts: at most all of them at once, then more once Serve has
    replaced those (each wave waits for its replacements)."""
    while n > 0:
        names = {_replica_id(name): (name, ns) for name, ns in pool_replicas(FLEET, POOL)}
        states = replica_states(FLEET, POOL) or {}
        running = [r for r, st in sorted(states.items()) if st == "RUNNING" and r in names]
        victims = running[:n]
        assert victims, f"no running host to kill: {states}"
        for r in victims:
            ray.kill(ray.get_actor(*names[r]), no_restart=True)
        eventually(
            lambda victims=victims: (
                (st := replica_states(FLEET, POOL)) is not None
                and not set(victims) & set(st)
                and sum(1 for s in st.values() if s == "RUNNING") == HOSTS
            ),
            90,
            0.5,
            f"Serve to replace hosts {victims}",
        )
        n -= len(victims)


def test_ten_thousand_tenants_500_agents_and_3_replacements_stay_bounded(start_fleet):
    spec = _spec()
    session = ray.get_runtime_context().get_session_name()
    fc = start_fleet(spec)
    half = TASKS // 2
    tasks = [
        {"capability": POOL, "payload": {"tenant": f"t{i}" if i % 100 else CONFIGURED}}
        for i in range(TASKS)
    ]
    ids = fc.submit(tasks[:half]).accepted
    assert fc.wait(ids, timeout_s=120) == []
    # The hosts send their counts to Ray each tick, and Ray's workers export them each
    # second: once the first half is on Ray's endpoint, the kills lose none of it.
    eventually(lambda: _counted(session) == half, 30, 0.5, f"{half} tasks counted")
    _replace_hosts(REPLACEMENTS)
    ids += fc.submit(tasks[half:]).accepted
    assert fc.wait(ids, timeout_s=120) == []
    assert len(ids) == TASKS

    # Every task counted, the replaced hosts' counts included (Ray's agent keeps a dead
    # process's counters, so sums never drop); the bound holds for all those series.
    eventually(lambda: _counted(session) == TASKS, 30, 0.5, f"{TASKS} tasks counted")
    series = _series(session)
    workers = {labels.get("WorkerId") for _, labels, _ in series if "pool" in labels}
    bound = max_series(spec, hosts_ever=HOSTS + REPLACEMENTS, shards=spec.queues.shards)
    assert len(series) <= bound, f"{len(series)} series over the bound {bound}"
    tenants = {labels["tenant"] for _, labels, _ in series if "tenant" in labels}
    assert tenants <= {CONFIGURED, OTHER_TENANT, NO_TENANT} and CONFIGURED in tenants
    assert OTHER_TENANT in tenants
    # The replaced hosts' series are among them: more processes than live hosts.
    assert len(workers) > HOSTS
