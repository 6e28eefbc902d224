"""Graceful degradation live (``pools[].degrade``, ``fleet.policy.degrade``): the
chaos harness makes a pool's agents slow; its predicted wait passes the rule's
threshold, so new tasks go to the fallback pool and their results say
``degraded: true`` with the rule, but for those whose ``cache_key`` the pool answered
recently, which are answered at once from its cache (``from_cache``); when the fault
clears the pool drains, the rule lets go after its calm period, and new tasks run on
the pool again. Nothing is lost."""

from __future__ import annotations

from fleet.chaos import ChaosHarness, ChaosPlan, chaotic_agent_kwargs
from fleet.cli.status import _human
from tests.utils import eventually, make_spec, pool

LATENCY_S = 1.0
FAULT_S = 120.0  # bounded: the fault ends when the harness stops (its with block)
RULE = "work.predicted_wait_s >= 1"


def test_a_slowed_pool_degrades_to_its_fallback_until_the_fault_clears(start_fleet):
    spec = make_spec(
        pool(
            "work",
            agent_class="fleet.agents.chaotic:ChaoticAgent",
            cpus_per_host=0,
            agent_kwargs=chaotic_agent_kwargs("degrade", "degrade", delay_s=0.02),
            autoscaling={
                "min_agents": 4,
                "max_agents": 4,
                "initial_agents": 4,
                "control_interval_s": 0.5,
            },
            degrade={
                "to_pool": "small",
                "from_cache": True,
                "predicted_wait_s": 1.0,
                "recover_after_s": 1.0,
            },
        ),
        pool(
            "small",
            agent_class="fleet.agents.testing:SleepAgent",
            cpus_per_host=0,
            agent_kwargs={"delay_s": 0.01},
            autoscaling={"min_agents": 2, "max_agents": 2, "initial_agents": 2},
        ),
        name="degrade",
        namespace="degrade",
    )
    fc = start_fleet(spec)

    def status() -> dict:
        return fc.status()["pools"]["work"]["admission"]

    def send(n: int, **task) -> list[str]:
        report = fc.submit([{"capability": "work", **task} for _ in range(n)])
        assert report.refused == [] and report.rejected == []
        return report.accepted

    # Warm up: the controller measures what the pool drains (4 agents of 20 ms). Two
    # questions are answered on the way, the cache's entries.
    sent = send(100)
    asked = {
        key: fc.submit(
            [{"capability": "work", "cache_key": key, "payload": {"answer": key}}]
        ).accepted[0]
        for key in ("faq-1", "faq-2")
    }
    assert fc.wait(list(asked.values()), timeout_s=30) == []
    eventually(lambda: status()["drain_per_s"], 30, 0.2, "a measured drain rate")
    plan = ChaosPlan(
        pool="work",
        duration_s=FAULT_S + 1,
        kill_share=0,
        latency_share=1.0,
        latency_s=LATENCY_S,
        latency_at_s=0,
        latency_duration_s=FAULT_S,
    )
    with ChaosHarness(fc, plan):
        # 50 tasks/s, far over the 4/s the slowed agents drain, until the rule holds.
        def degraded_now() -> str | None:
            sent.extend(send(10))
            return status()["degraded"]

        assert eventually(degraded_now, 20, 0.2, "the pool degraded") == RULE

        # New tasks go to the fallback now (once this client's view has the rule).
        def view_degraded() -> bool:
            fc.admission.refresh()
            return bool(fc.admission.policy.degraded())

        eventually(view_degraded, 5, 0.1, "the client's view")
        during = send(20)
        # Asked again: answered from the cache, at once, with the pool's answer; a
        # question it never answered goes to the fallback like the rest.
        again = fc.submit(
            [
                {"capability": "work", "cache_key": "faq-1", "payload": {"q": "?"}},
                {"capability": "work", "cache_key": "faq-2", "payload": {"q": "?"}},
            ]
        )
        during += send(1, cache_key="faq-new")
    # The fault is over: the pool drains, and after its calm period the rule lets go.
    eventually(lambda: status()["degraded"] is None, 30, 0.2, "the pool recovered")

    def view_recovered() -> bool:
        fc.admission.refresh()
        return not fc.admission.policy.degraded()

    eventually(view_recovered, 5, 0.1, "the client's view of the recovery")
    after = send(20)
    for key, i in zip(("faq-1", "faq-2"), again.accepted):
        r = again.existing[i]
        assert (r.output, r.pool, r.degraded_rule, r.deliveries) == (
            {"answer": key},
            "work",
            RULE,
            0,
        ), r
        assert fc.results([i])[0] == r  # recorded as its own outcome
    every = sent + during + after + again.accepted
    assert fc.wait(every, timeout_s=120) == []  # 0 lost
    results = {r.task_id: r for r in fc.results(every)}
    assert all(r.status.value == "completed" for r in results.values())
    for i in during:
        r = results[i]
        assert (r.pool, r.degraded, r.degraded_rule) == ("small", True, RULE), r
    for i in after:
        assert (results[i].pool, results[i].degraded) == ("work", False), results[i]
    degraded = [r for r in results.values() if r.degraded]
    assert {r.pool for r in degraded if r.task_id not in again.accepted} == {"small"}
    assert status()["degraded_tasks"] == {"default": len(degraded)}
    assert f"degraded (fallback or cache): default {len(degraded)}" in _human(fc.status())
