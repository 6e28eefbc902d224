"""Per-task recording in the host (no Ray: a fake ledger, real agents on an asyncio
loop): each outcome is recorded as its task finishes, coalesced per ledger shard; an
agent that ignores cancellation is abandoned without holding its batch-mates; a retried
delivery is excused (it ran no duplicate)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from fleet.runtime.host import AgentHost
from fleet.task import Item, to_item
from tests.utils import FakeLedger, eventually_async, pool


def _host(
    agents: int,
    resilience: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    **pool_kw: Any,
) -> tuple[AgentHost, FakeLedger]:
    spec = pool(
        "work",
        agent_class=pool_kw.pop("agent_class", "fleet.agents.testing:SleepAgent"),
        agents_per_host=agents,
        autoscaling={"min_agents": agents, "max_agents": agents},
        **pool_kw,
    )
    host = AgentHost(spec, resilience or {"retry": {"max_attempts": 1}}, health=health)
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


def _item(**payload: Any) -> Item:
    return to_item({"capability": "work", "payload": payload}, {"work"})._replace(deliveries=1)


def test_each_outcome_is_recorded_when_its_task_finishes_not_with_the_batch():
    host, ledger = _host(40)
    fast = [_item(sleep_s=0.05, i=i) for i in range(36)]
    slow = [_item(sleep_s=1.5, i=i) for i in range(4)]

    async def run() -> None:
        batch = asyncio.get_running_loop().create_task(host.run_and_record(fast + slow))
        fast_ids = {it.id for it in fast}
        # Well before the slow ones end (1.5 s): fast batch-mates wait for nobody.
        await eventually_async(
            lambda: {o.task_id for o in ledger.outcomes} >= fast_ids,
            1.0,
            0.02,
            what="every fast task recorded while the slow ones run",
        )
        assert not batch.done()
        recorded = {o.task_id for o in ledger.outcomes}
        assert recorded == fast_ids, "only the fast ones so far"
        assert ledger.calls <= 4, f"coalesced, not one call per task: {ledger.calls}"
        report = await batch
        assert report.recorded == 40 and report.retry_ids == []

    asyncio.run(run())
    assert {o.task_id for o in ledger.outcomes} == {it.id for it in fast + slow}
    for o in ledger.outcomes:  # recorded within moments of its own finish
        assert ledger.recorded_at[o.task_id] - o.finished_unix_s < 0.5, o


def test_a_wedged_agent_is_abandoned_and_its_batch_mates_are_recorded_on_time():
    """A batch of 50 with task_timeout_s 3 s: the agent that swallows cancellation fails
    with ``timeout`` and the 49 others are each recorded within their own duration plus
    1 s; the host then serves the next batch."""
    # Retries allowed: an abandoned task is still not retried (it would wedge another).
    host, ledger = _host(
        50,
        resilience={"task_timeout_s": 3.0, "retry": {"max_attempts": 3}},
        health={"hung_task_grace_s": 1.0},
    )
    rng = random.Random(7)
    mates = [_item(sleep_s=round(rng.uniform(0.05, 2.5), 3), i=i) for i in range(49)]
    # Wedged until well after it is abandoned (task_timeout_s + grace), then it ends,
    # so the test's loop can close.
    wedged = _item(wedge_s=7.0)

    async def run() -> None:
        report = await host.run_and_record([*mates[:25], wedged, *mates[25:]])
        assert report.recorded == 50 and report.retry_ids == []
        assert host.abandoned == 1
        after = await host.run_and_record([_item(sleep_s=0.01, i=i) for i in range(20)])
        assert after.recorded == 20  # the host keeps serving
        # Not a wait for a condition: the wedged agent (wedge_s 7) must end while the loop
        # still runs, so that a late result it produced would be seen (and dropped).
        await asyncio.sleep(3.5)
        # Health found the wedged agent hung: its slot went to a fresh instance, and the
        # abandoned task's late end released nothing more.
        assert host.restarts >= 1 and [a.in_flight for a in host.core.agents] == [0] * 50

    asyncio.run(run())
    by_id = {o.task_id: o for o in ledger.outcomes}
    w = by_id[wedged.id]
    assert (w.ok, w.reason) == (False, "timeout") and "abandoned" in w.error
    for it in mates:
        o = by_id[it.id]
        took = ledger.recorded_at[it.id] - o.started_unix_s
        assert o.ok and took <= it_sleep(it) + 1.0, (took, it_sleep(it))
    assert len(ledger.outcomes) == 70, "the wedged task's late end recorded nothing"


def it_sleep(it: Item) -> float:
    import orjson

    return float(orjson.loads(it.payload)["sleep_s"])


def test_a_delivery_handed_back_for_a_retry_is_excused_in_the_ledger():
    host, ledger = _host(
        2,
        resilience={
            "retry": {"max_attempts": 3, "initial_backoff_s": 0.1, "jitter_ratio": 0.0}
        },
        agent_class="fleet.agents.faulty:FaultyAgent",
        agent_kwargs={"delay_s": 0.0, "bad_agents": [0, 1], "fail_rate": 1.0},
    )
    failing = [_item(i=i) for i in range(3)]

    async def run() -> Any:
        report = await host.run_and_record(failing)
        # Excusals ride the shard's next coalesced call.
        await eventually_async(
            lambda: len(ledger.excused) == len(failing), 2, 0.01, what="excusals sent"
        )
        return report

    report = asyncio.run(run())
    assert report.recorded == 0 and sorted(report.retry_ids) == sorted(i.id for i in failing)
    assert sorted(ledger.excused) == sorted(i.id for i in failing)
    assert ledger.calls == 1 and ledger.outcomes == []
