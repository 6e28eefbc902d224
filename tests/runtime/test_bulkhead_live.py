"""Bulkheads live (``bulkheads:``, ``fleet.policy.bulkhead``): a tenant that floods a
pool with ten times its queued limit gets the rest refused (reason ``bulkhead``), never
has more tasks running than its in-flight limit, and takes neither queue room nor
agents from another tenant, whose tasks are all accepted and run. The victim's latency
under the flood is a benchmark figure, not this test's."""

from __future__ import annotations

import time

from fleet.cli.status import _human
from fleet.policy.admission import PoolLoad
from fleet.stats import most_at_once
from tests.utils import eventually, make_spec, pool

SLEEP = "fleet.agents.testing:SleepAgent"
QUEUED, IN_FLIGHT = 20, 4  # the flooding tenant's limits (two shards: half each)


def test_a_tenant_flooding_past_its_bulkhead_takes_nothing_from_another(start_fleet):
    spec = make_spec(
        pool(
            "work",
            agent_class=SLEEP,
            cpus_per_host=0,
            agent_kwargs={"delay_s": 0.2},
            autoscaling={"min_agents": 8, "max_agents": 8, "initial_agents": 8},
        ),
        name="bulkhead",
        namespace="bulkhead",
        bulkheads={"tenant": {"max_queued": QUEUED, "max_in_flight": IN_FLIGHT}},
    )
    fc = start_fleet(spec)
    flood = fc.submit(
        [
            {"capability": "work", "id": f"f{k}", "payload": {"sleep_s": 1.0}}
            for k in range(10 * QUEUED)
        ],
        tenant="flood",
    )
    # Each shard takes its half of the flood's limit, and refuses the rest at once.
    assert len(flood.accepted) == QUEUED, len(flood.accepted)
    assert len(flood.refused) == 9 * QUEUED
    assert {r.reason for r in flood.refused} == {"bulkhead"}
    assert {r.retry_after_s for r in flood.refused} == {spec.bulkheads.retry_after_s}
    assert all(r.id.startswith("@flood:") for r in flood.refused)

    # What the flood's share holds back is not work ahead of anyone else: the first load
    # the controller publishes after the flood was queued (its 20 tasks of 1 s take 5 s
    # to drain, 4 at a time) counts only the 4 it can run.
    queued = time.time()

    def first_view_since() -> PoolLoad | None:
        fc.admission.refresh()
        load = fc.admission.policy.load("work")
        return load if load is not None and load.taken_unix_s > queued else None

    load = eventually(first_view_since, 10, 0.05, "a load taken after the flood queued")
    assert sum(load.pending) == IN_FLIGHT, load.pending

    # The victim's tasks, sent while the flood's fill their share: none refused.
    victim = fc.submit([{"capability": "work", "id": f"v{k}"} for k in range(8)], tenant="v")
    assert victim.refused == [] and len(victim.accepted) == 8
    assert fc.wait(flood.accepted + victim.accepted, timeout_s=60) == []
    done = fc.results(flood.accepted)
    assert all(r.status.value == "completed" for r in done)
    # The flood's tasks ran IN_FLIGHT at a time at most, and its limit was what held
    # them (eight agents were there to take more).
    assert most_at_once((r.started_unix_s, r.finished_unix_s) for r in done) == IN_FLIGHT
    assert all(r.status.value == "completed" for r in fc.results(victim.accepted))
    bulkhead = fc.status()["pools"]["work"]["queue"]["bulkhead"]
    assert bulkhead["refused"] == {"flood": 9 * QUEUED}
    assert "refused flood 180" in _human(fc.status())
