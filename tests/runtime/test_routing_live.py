"""Routing, breakers, retries and backpressure in the runtime.

First the host on its own (no Ray: a fake ledger, real agents on an asyncio loop): the
pool's router picks an agent per task, ejected agents take no work, retryable failures
come back with a delay instead of being recorded. Then two live runs on the session's
local Ray cluster: a resilience run (flaky and hanging agents, success-rate routing,
breakers, retries) and a backpressure run (a producer ten times faster than the fleet).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from typing import Any

import pytest
import ray
from ray import serve

from fleet.observability import scrape
from fleet.runtime.client import FleetClient, QueueFullError
from fleet.runtime.host import AgentHost
from fleet.runtime.names import Names
from fleet.task import Item, to_item
from tests.utils import FakeLedger, eventually, make_spec, pool

_ids = itertools.count()


# --- the host alone -------------------------------------------------------------------


def _host(
    agents: int = 10, resilience: dict[str, Any] | None = None, **pool_kw: Any
) -> tuple[AgentHost, FakeLedger]:
    spec = pool(
        "work",
        agent_class=pool_kw.pop("agent_class", "fleet.agents.testing:SleepAgent"),
        agents_per_host=agents,
        autoscaling={"min_agents": agents, "max_agents": agents},
        **pool_kw,
    )
    host = AgentHost(spec, resilience)
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


def _items(n: int, deliveries: int = 1, **payload: Any) -> list[Item]:
    return [
        to_item({"capability": "work", "payload": {"i": i, **payload}}, {"work"})._replace(
            deliveries=deliveries
        )
        for i in range(n)
    ]


def _index(agent_id: str | None) -> int:
    assert agent_id is not None
    return int(agent_id.rsplit("/", 1)[1])


def test_host_routes_each_task_with_the_pool_router():
    # Round robin over 4 agents with 3 slots each: 12 tasks at once land 3 per agent,
    # where filling the first free slots would have put them on agents 0..3 unevenly.
    host, ledger = _host(
        4,
        routing={"router": "round_robin"},
        concurrency_per_agent=3,
        agent_kwargs={"delay_s": 0.05},
    )
    report = asyncio.run(host.run_and_record(_items(12)))
    assert report.recorded == 12 and report.retry_ids == []
    assert Counter(_index(o.agent_id) for o in ledger.outcomes) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert report.host["agents"] == 4 and report.host["ejected"] == 0


def test_ejected_agents_take_no_work_and_show_in_stats():
    host, ledger = _host(10, agent_kwargs={"delay_s": 0.0})
    host.core.breakers.registry.agent(host.core.agents[2].id).force_open("test")

    async def run() -> None:
        for _ in range(5):
            await host.run_and_record(_items(30))

    asyncio.run(run())
    used = {_index(o.agent_id) for o in ledger.outcomes}
    assert 2 not in used and len(ledger.outcomes) == 150
    assert len(used) == 9
    st = asyncio.run(host.stats())
    assert st["breakers"]["ejected"] == [host.core.agents[2].id]
    assert host.pool_stats()["ejected"] == 1
    opened = [e for e in st["breaker_events"] if e["new"] == "open"]
    assert opened and opened[0]["name"].endswith("/2") and "forced" in opened[0]["reason"]


def test_retryable_failures_come_back_with_a_delay_and_only_the_last_is_recorded():
    host, ledger = _host(
        2,
        agent_class="fleet.agents.faulty:FaultyAgent",
        agent_kwargs={"delay_s": 0.0, "bad_agents": [0, 1], "fail_rate": 1.0},
        resilience={
            "retry": {"max_attempts": 3, "initial_backoff_s": 0.5, "jitter_ratio": 0.0}
        },
    )
    first = asyncio.run(host.run_and_record(_items(4, deliveries=1)))
    assert first.recorded == 0 and len(first.retry_ids) == 4
    assert first.retry_delays_s == [0.5] * 4  # attempt 1: initial backoff, no jitter
    assert ledger.outcomes == [] and host.retries == 4
    last = asyncio.run(host.run_and_record(_items(4, deliveries=3)))
    assert last.recorded == 4 and last.retry_ids == []
    assert {o.reason for o in ledger.outcomes} == {"max_attempts"}
    assert "UpstreamError" in ledger.outcomes[0].error
    assert asyncio.run(host.stats())["final_failures"] == {"max_attempts": 4}


def test_a_dependency_breaker_stops_calls_to_a_service_that_is_down():
    from fleet.agents.faulty import OutageAgent

    service = OutageAgent.SERVICE
    service.update(down=True, calls=0)
    host, ledger = _host(
        5,
        agent_class="fleet.agents.faulty:OutageAgent",
        resilience={
            "dependency_breakers": {
                "llm": {"window_calls": 10, "min_calls": 5, "open_duration_s": 300}
            },
            "retry": {"max_attempts": 2, "jitter_ratio": 0.0},
        },
    )
    try:
        first = asyncio.run(host.run_and_record(_items(5)))
        # All five reached the service, failed, and go back for a retry.
        assert service["calls"] == 5 and len(first.retry_ids) == 5
        # The breaker is open now: the next tasks fail fast without calling it, and
        # the failure is retryable (the service may come back).
        second = asyncio.run(host.run_and_record(_items(5)))
        assert service["calls"] == 5
        assert len(second.retry_ids) == 5 and ledger.outcomes == []
        last = asyncio.run(host.run_and_record(_items(3, deliveries=2)))
        assert last.recorded == 3 and service["calls"] == 5
        assert all(
            "DependencyUnavailable" in o.error and o.reason == "max_attempts"
            for o in ledger.outcomes
        ), ledger.outcomes
        events = asyncio.run(host.stats())["breaker_events"]
        opened = [e for e in events if e["name"] == "dependency:llm" and e["new"] == "open"]
        assert len(opened) == 1, events
    finally:
        service.update(down=False, calls=0)


def test_non_retryable_failures_are_recorded_at_once():
    host, ledger = _host(2, agent_kwargs={"delay_s": 0.0})
    report = asyncio.run(host.run_and_record(_items(3, fail="bad input")))
    assert report.recorded == 3 and report.retry_ids == []
    assert {o.reason for o in ledger.outcomes} == {"error"}  # ValueError: not retryable


# --- live -------------------------------------------------------------------------------


def _live_spec(pool_kw: dict[str, Any], **kw: Any):
    n = next(_ids)
    return make_spec(
        pool("work", cpus_per_host=0, **pool_kw),
        name=f"r{n}",
        namespace=f"fleet-routing-test-{n}",
        **kw,
    )


def _host_stats(fc: FleetClient) -> dict[str, Any]:
    handle = serve.get_deployment_handle(
        Names.host_deployment("work"), fc.names.pool_app("work")
    )
    return handle.stats.remote(None).result(timeout_s=30)


AGENTS = 20
FLAKY = [3, 11]  # 10% of the agents fail half their tasks
HUNG = 7  # and one hangs
RECOVER_AFTER_S = 6.0
RUN_S = 10.0
RATE_PER_S = 200
READMIT_WAIT_S = 25.0


def _replay(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Walk a host's breaker events: most agents ejected at once, when each agent was
    first ejected (or refused by the cap) and last closed again."""
    ejected: set[str] = set()
    most = 0
    opened: dict[int, float] = {}
    denied: dict[int, float] = {}
    closed: dict[int, float] = {}
    for e in events:
        idx = _index(e["name"])
        if e["kind"] == "ejection_denied":
            denied.setdefault(idx, e["at_unix_s"])
        if e["kind"] != "transition":
            continue
        if e["new"] == "closed":
            ejected.discard(e["name"])
            closed[idx] = e["at_unix_s"]
        else:
            ejected.add(e["name"])
            opened.setdefault(idx, e["at_unix_s"])
        most = max(most, len(ejected))
    return {"most": most, "opened": opened, "denied": denied, "closed": closed}


@pytest.mark.ray
def test_breakers_eject_bad_agents_within_the_cap_and_readmit_them(start_fleet):
    spec = _live_spec(
        {
            "agent_class": "fleet.agents.faulty:FaultyAgent",
            "agent_kwargs": {
                "delay_s": 0.02,
                "bad_agents": FLAKY,
                "fail_rate": 0.5,
                "hang_agents": [HUNG],
                "recover_after_s": RECOVER_AFTER_S,
                "seed": 7,
            },
            "agents_per_host": AGENTS,
            "autoscaling": {"min_agents": AGENTS, "max_agents": AGENTS},
            "routing": {
                "router": "success_rate",
                "success_rate": {"window_s": 3, "min_calls": 5, "min_success_rate": 0.8},
            },
        },
        queues={"lease_s": 20},
        resilience={
            "task_timeout_s": 0.5,
            "agent_breaker": {
                "window_calls": 10,
                "min_calls": 4,
                "failure_rate_threshold": 0.3,
                "open_duration_s": 1.5,
                "max_open_duration_s": 3,
                "half_open_probe_calls": 2,
            },
            "retry": {"max_attempts": 4, "initial_backoff_s": 0.05, "max_backoff_s": 0.5},
        },
    )
    fc = start_fleet(spec)
    ids: list[str] = []
    status_ejected: list[int] = []
    t0 = time.time()

    def submit_until(t_end: float, stop=lambda: False) -> None:
        tick = 0.05
        t_start, n0 = time.time(), len(ids)
        while time.time() < t_end and not stop():
            ids.extend(
                fc.submit(
                    [
                        {"capability": "work", "payload": {"n": len(ids) + k}}
                        for k in range(int(RATE_PER_S * tick))
                    ]
                ).accepted
            )
            if len(ids) % 100 < RATE_PER_S * tick:  # about twice a second
                status_ejected.append(fc.status()["pools"]["work"]["ejected_agents"])
            time.sleep(max(0.0, t_start + (len(ids) - n0) / RATE_PER_S - time.time()))

    # Faulty period and a little after; then traffic goes on until every ejected
    # agent has been re-admitted (it needs traffic for its half-open probes), and 2 s
    # more so that re-admitted agents show they take work again. An agent can trip in
    # those 2 s (the hung one's late timeouts did): then traffic goes on again.
    submit_until(t0 + RUN_S)
    deadline = t0 + RUN_S + READMIT_WAIT_S
    while True:
        submit_until(deadline, stop=lambda: _host_stats(fc)["breakers"]["ejected"] == [])
        submit_until(time.time() + 2.0)
        if _host_stats(fc)["breakers"]["ejected"] == [] or time.time() >= deadline:
            break
    assert fc.wait(ids, timeout_s=60) == []
    s = fc.summary(ids)
    assert s["lost"] == 0
    assert s["completed"] >= 0.99 * len(ids), s

    st = _host_stats(fc)
    cap = st["breakers"]["max_ejected"]
    assert cap == 2  # 10% of 20 agents
    events = st["breaker_events"]
    for e in events:  # shown when the test fails
        print(
            f"{e['at_unix_s'] - t0:7.2f} {e['name']:>24} {e['kind']:16} "
            f"{e['old']}->{e['new']} {e['reason']}"
        )
    for e in st["health"]["events"]:  # restarts, shown when the test fails
        print(f"{e['at_unix_s'] - t0:7.2f} health {e}")
    assert len(events) < 1_000, "the event log must not have wrapped"
    r = _replay(events)
    # Never more than the cap ejected at once, and the cap was used.
    assert 1 <= r["most"] <= cap
    bad = set(FLAKY) | {HUNG}
    assert set(r["opened"]) <= bad, f"a healthy agent was ejected: {r['opened']}"
    # The flaky agents trip (ejected, or refused by the full cap) within their breaker
    # window: min_calls = 4 calls at about 10 tasks/s per agent, so well inside 5 s
    # even on a loaded machine.
    for idx in FLAKY:
        tripped = min(r["opened"].get(idx, math.inf), r["denied"].get(idx, math.inf))
        assert tripped - t0 < 5.0, (idx, r)
    # Re-admitted after they recover: every ejected agent closed again, and works.
    assert st["breakers"]["ejected"] == []
    for idx, at in r["opened"].items():
        assert r["closed"].get(idx, 0) > at, (idx, r)
    results = fc.results(ids)
    for idx in r["opened"]:
        after = [
            x
            for x in results
            if x is not None
            and _index(x.agent_id) == idx
            and x.status == "completed"
            and x.started_unix_s > r["closed"][idx]
        ]
        assert after, f"agent {idx} took no work after it was re-admitted"
    # Retries happened and are counted; the pool status showed the ejections.
    pool_status = fc.status()["pools"]["work"]
    assert pool_status["retried_items"] > 0 and pool_status["host_retries"] > 0
    assert max(x.deliveries for x in results if x is not None) >= 2
    assert 1 <= max(status_ejected) <= cap, status_ejected

    # ... and the Prometheus metrics carry the same counts (exported through Ray's
    # metrics agents, about a second behind).
    def exported() -> bool:
        text = fc.metrics_text()
        cap_exported = scrape.total(
            text, "ray_fleet_breaker_max_ejected_agents", pool="work", fleet=fc.spec.name
        )
        retries = scrape.total(
            text, "ray_fleet_task_retries_total", pool="work", fleet=fc.spec.name
        )
        assert cap_exported == cap and retries > 0, (cap_exported, retries)
        return True

    eventually(exported, 15, 0.5, what="the breaker cap and retries exported")


@pytest.mark.ray
def test_backpressure_bounds_the_queue_and_loses_nothing(start_fleet):
    max_depth = 200
    spec = _live_spec(
        {
            "agent_class": "fleet.agents.testing:SleepAgent",
            "agent_kwargs": {"delay_s": 0.05},
            "agents_per_host": 4,
            "autoscaling": {"min_agents": 4, "max_agents": 4},
        },
        queues={"max_depth": max_depth, "shards": 1, "lease_s": 20},
    )
    fc = start_fleet(spec)
    shard = ray.get_actor(fc.names.shard("work", 0), namespace=spec.namespace)
    dispatcher = ray.get_actor(fc.names.dispatcher, namespace=spec.namespace)
    drain_per_s = 4 / 0.05
    rate = 10 * drain_per_s
    accepted: list[str] = []
    full_errors: list[str] = []
    pending_max = in_flight_max = 0
    t0 = time.time()
    sent = 0
    while time.time() - t0 < 4.0:
        batch = [{"capability": "work", "payload": {"n": sent + k}} for k in range(20)]
        sent += len(batch)
        try:
            # One shard and 20 tasks: a single all-or-nothing put per call.
            accepted += fc.submit(batch, timeout_s=0.02).accepted
        except QueueFullError as exc:
            full_errors.append(str(exc))
        q = ray.get(shard.stats.remote())
        pending_max = max(pending_max, q["depth"] + q["leased"])
        in_flight_max = max(
            in_flight_max, ray.get(dispatcher.stats.remote())["work"]["in_flight"]
        )
        time.sleep(max(0.0, t0 + sent / rate - time.time()))
    assert full_errors, "a producer 10x faster than the fleet must hit the bound"
    assert "queue full" in full_errors[0] and "retry later" in full_errors[0]
    assert pending_max <= max_depth, pending_max  # memory held by the queue is bounded
    assert in_flight_max <= 4, "work beyond the agents' slots stays queued"
    assert len(accepted) < sent
    # A patient producer waits for room instead of failing: 50 do not fit now.
    assert ray.get(shard.room.remote()) < 50
    more = fc.submit(
        [{"capability": "work", "payload": {"late": k}} for k in range(50)], timeout_s=60
    ).accepted
    assert len(more) == 50
    assert fc.wait(accepted + more, timeout_s=120) == []
    s = fc.summary(accepted + more)
    assert (s["lost"], s["completed"], s["failed"]) == (0, len(accepted) + 50, 0)


@pytest.mark.ray
def test_a_slow_task_does_not_hold_its_batch_capacity(start_fleet):
    # 4 agents, 1 slot each, one shard. Five tasks, two of them slow: the dispatcher
    # leases one item first (it does not know the depth yet), then three, so one slow
    # task runs alone and the other shares a batch with two fast ones, and all four
    # slots are taken. The host reports the two fast ones done, so their slots take new
    # work while the slow ones still run: tasks submitted later finish before them.
    # (Without the reports, the slow batch held its three slots until it finished.)
    spec = _live_spec(
        {
            "agent_class": "fleet.agents.testing:SleepAgent",
            "agent_kwargs": {"delay_s": 0.01},
            "agents_per_host": 4,
            "autoscaling": {"min_agents": 4, "max_agents": 4},
        },
        queues={"shards": 1, "lease_s": 20},
    )
    fc = start_fleet(spec)
    first = fc.submit(
        [{"capability": "work", "payload": {"sleep_s": 5.0}}] * 2
        + [{"capability": "work", "payload": {"k": k}} for k in range(3)]
    ).accepted
    eventually(
        lambda: fc.status()["pools"]["work"]["queue"]["depth"] == 0,
        30,
        0.1,
        what="the first five leased",
    )
    later = fc.submit(
        [{"capability": "work", "payload": {"n": n}} for n in range(20)]
    ).accepted
    assert fc.wait(first + later, timeout_s=60) == []
    slow = fc.results(first[:2])
    done = fc.results(later)
    assert all(r.status == "completed" for r in slow + done)
    assert max(r.finished_unix_s for r in done) < min(r.finished_unix_s for r in slow)
