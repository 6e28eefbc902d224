"""Agent health inside a host (no Ray: a fake ledger, real agents on an asyncio loop):
failed agents leave service at once and are restarted in the host with backoff; hung
tasks, missed heartbeats; the Serve health probe. The live cascade test is at the end."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any, ClassVar

import pytest

from fleet.agent import Agent
from fleet.observability import scrape
from fleet.policy.health import AgentState
from fleet.runtime.host import AgentHost
from fleet.task import Item, Task, to_item
from tests.utils import FakeLedger, eventually, eventually_async, pool

AGENT = "tests.runtime.test_host_health:SwitchAgent"


class SwitchAgent(Agent):
    """Fails its tasks, heartbeats and setup while its index is in ``broken``; hangs
    (ignoring cancellation) while in ``stubborn``, until ``release`` is set."""

    broken: ClassVar[set[int]] = set()
    stubborn: ClassVar[set[int]] = set()
    release: ClassVar[asyncio.Event | None] = None
    setups: ClassVar[Counter[int]] = Counter()

    def __init__(self, agent_id: str, **kwargs: Any):
        super().__init__(agent_id, **kwargs)
        self.index = int(agent_id.rsplit("/", 1)[1])

    async def setup(self) -> None:
        SwitchAgent.setups[self.index] += 1
        if self.index in self.broken:
            raise ConnectionError(f"agent {self.index} cannot start")

    async def heartbeat(self) -> None:
        if self.index in self.broken:
            raise ConnectionError(f"agent {self.index} is broken")

    async def handle(self, task: Task) -> Any:
        if self.index in self.stubborn:
            assert self.release is not None
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    continue  # a wedged agent: ignores the watchdog's cancel
        await asyncio.sleep(0.001)
        if self.index in self.broken:
            raise ValueError(f"agent {self.index} is broken")
        return task.payload


@pytest.fixture(autouse=True)
def _reset_switches():
    SwitchAgent.broken = set()
    SwitchAgent.stubborn = set()
    SwitchAgent.setups = Counter()
    yield


FAST_HEALTH = {
    "heartbeat_interval_s": 0.2,
    "heartbeat_timeout_s": 0.6,
    "startup_timeout_s": 1.0,
    "hung_task_grace_s": 0.3,
    "error_window_s": 5,
    "error_min_calls": 3,
    "error_rate_threshold": 0.5,
    "restart": {"initial_backoff_s": 0.1, "max_backoff_s": 2.0, "jitter_ratio": 0.0},
}


def _host(
    agents: int, health: dict[str, Any] | None = None, resilience: dict[str, Any] | None = None
) -> tuple[AgentHost, FakeLedger]:
    spec = pool(
        "work",
        agent_class=AGENT,
        agents_per_host=agents,
        autoscaling={"min_agents": agents, "max_agents": agents},
    )
    host = AgentHost(
        spec, resilience or {"retry": {"max_attempts": 1}}, health=health or FAST_HEALTH
    )
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


_n = itertools.count()


def _items(n: int) -> list[Item]:
    return [
        to_item({"capability": "work", "payload": {"i": next(_n)}}, {"work"}) for _ in range(n)
    ]


def _index(agent_id: str | None) -> int:
    assert agent_id is not None
    return int(agent_id.rsplit("/", 1)[1])


UNTIL_S = 10.0  # how long a host test waits for a health transition


def test_a_failing_agent_leaves_service_at_once_and_is_restarted_with_backoff():
    host, ledger = _host(10)
    SwitchAgent.broken = {2}
    bad = host.core.agents[2].id

    async def run() -> None:
        for _ in range(6):
            await host.run_and_record(_items(20))
        # Out of service after error_min_calls failures: no more work reaches it.
        failed_on_2 = sum(1 for o in ledger.outcomes if _index(o.agent_id) == 2)
        assert failed_on_2 == FAST_HEALTH["error_min_calls"]
        assert host.core.health.monitor.state(bad) is not AgentState.HEALTHY
        # Restarted in the host (setup again), failing again while broken: the backoff
        # doubles per consecutive failure.
        await eventually_async(
            lambda: host.core.health.monitor.agent(bad).failures >= 3, UNTIL_S, 0.02
        )
        assert SwitchAgent.setups[2] >= 2
        gaps = [
            e
            for e in host.core.health.events.events
            if e.subject == bad and e.new == "restarting"
        ]
        assert len(gaps) >= 2
        spacing = [b.at_s - a.at_s for a, b in itertools.pairwise(gaps)]
        assert spacing == sorted(spacing), spacing  # 0.2, 0.4, ...: never shorter
        # The fault is removed: the next restart succeeds and the agent works again.
        SwitchAgent.broken = set()
        await eventually_async(
            lambda: host.core.health.monitor.state(bad) is AgentState.HEALTHY, UNTIL_S, 0.02
        )
        ledger.outcomes.clear()
        for _ in range(5):
            await host.run_and_record(_items(20))
        assert 2 in {_index(o.agent_id) for o in ledger.outcomes}
        assert all(o.ok for o in ledger.outcomes)

    asyncio.run(run())
    st = asyncio.run(host.stats())["health"]
    assert st["restarts"] >= 2 and st["last_failures"][0]["reason"] == "error_rate"
    assert all(f["agent_id"] == bad for f in st["last_failures"])
    assert host.health_report()["failures"]["error_rate"] >= 1


def test_a_task_that_ignores_its_timeout_marks_its_agent_hung_and_frees_the_slot():
    host, ledger = _host(2, resilience={"task_timeout_s": 0.3, "retry": {"max_attempts": 1}})
    SwitchAgent.stubborn = {0}

    async def run() -> None:
        SwitchAgent.release = asyncio.Event()
        wedged = asyncio.get_running_loop().create_task(host.run_and_record(_items(1)))
        await eventually_async(lambda: host.core.agents[0].in_flight == 1, UNTIL_S, 0.02)
        # Past task_timeout_s + hung_task_grace_s: hung, restarted, its slot given back.
        await eventually_async(
            lambda: host.core.health.monitor.agent(host.core.agents[0].id).restarts >= 1,
            UNTIL_S,
            0.02,
        )
        SwitchAgent.stubborn = set()
        await eventually_async(
            lambda: (
                host.core.health.monitor.state(host.core.agents[0].id) is AgentState.HEALTHY
            ),
            UNTIL_S,
            0.02,
        )
        assert host.core.agents[0].in_flight == 0
        await host.run_and_record(_items(10))
        assert {_index(o.agent_id) for o in ledger.outcomes if o.ok} == {0, 1}
        SwitchAgent.release.set()  # the old instance finally lets go
        report = await wedged
        assert report.recorded == 1
        assert [a.in_flight for a in host.core.agents] == [0, 0], (
            "the orphan's late end released nothing"
        )

    asyncio.run(run())
    failures = list(host.core.health.monitor.failures)
    assert failures[0].reason == "hung_task" and "limit 0.3s" in failures[0].detail
    # The wedged task swallowed its cancel and finished: recorded once, like the rest.
    assert len(ledger.outcomes) == 11 and len({o.task_id for o in ledger.outcomes}) == 11


def test_missed_heartbeats_take_an_agent_out_and_the_probe_reports_a_dead_host():
    host, _ = _host(1)
    agent_id = host.core.agents[0].id

    async def run() -> None:
        await host.run_and_record(_items(3))  # the agent exists; the health loop runs
        await host.check_health()
        SwitchAgent.broken = {0}  # its heartbeat fails from now on
        await eventually_async(
            lambda: any(
                f.reason == "heartbeat_missed" for f in host.core.health.monitor.failures
            ),
            UNTIL_S,
            0.02,
        )
        assert not host.core.slots.is_routable(host.core.agents[0])
        # One agent, failed and not coming back (setup fails): after startup_timeout_s
        # with nothing in service, Serve's probe fails so that the host is replaced.
        await eventually_async(lambda: host.health_problem() is not None, UNTIL_S, 0.02)
        with pytest.raises(RuntimeError, match="no agent in service"):
            await host.check_health()
        SwitchAgent.broken = set()
        await eventually_async(
            lambda: host.core.health.monitor.state(agent_id) is AgentState.HEALTHY,
            UNTIL_S,
            0.02,
        )
        await host.check_health()

    asyncio.run(run())
    reasons = {f.reason for f in host.core.health.monitor.failures}
    assert reasons >= {"heartbeat_missed", "crashed"}


# --- live: 30% of a pool's agents fail at once ----------------------------------------------

CASCADE_AGENTS = 20
BROKEN = 6  # 30%
RATE_PER_S = 100
RESTARTS_PER_INTERVAL = 1
INTERVAL_S = 2.0
FAULT_S = 8.0


@pytest.mark.ray
def test_cascade_opens_the_fleet_breaker_throttles_restarts_and_recovers(start_fleet):
    import ray

    from fleet.agents.chaotic import FAIL, Switchboard
    from fleet.chaos import chaotic_agent_kwargs, switchboard_name
    from fleet.cli.status import _human
    from fleet.runtime.fleet_health import CASCADE_ALERT
    from tests.utils import make_spec

    name, ns = "cascade", "fleet-cascade-test"
    spec = make_spec(
        pool(
            "work",
            agent_class="fleet.agents.chaotic:ChaoticAgent",
            cpus_per_host=0,
            agent_kwargs=chaotic_agent_kwargs(name, ns, delay_s=0.005),
            agents_per_host=CASCADE_AGENTS // 2,
            autoscaling={"min_agents": CASCADE_AGENTS, "max_agents": CASCADE_AGENTS},
        ),
        name=name,
        namespace=ns,
        queues={"lease_s": 20},
        resilience={
            "max_deliveries": 12,
            "retry": {
                "max_attempts": 10,
                "initial_backoff_s": 0.05,
                "max_backoff_s": 0.5,
                "budget_ratio": 1.0,
            },
        },
        health={
            "heartbeat_interval_s": 0.5,
            "heartbeat_timeout_s": 4.0,
            "startup_timeout_s": 10,
            "error_window_s": 5,
            "error_min_calls": 3,
            "restart": {
                "initial_backoff_s": 0.2,
                "max_backoff_s": 2.0,
                "eject_after_failures": None,
            },
            "cascade": {
                "cascade_share": 0.1,
                "max_restarts_per_interval": RESTARTS_PER_INTERVAL,
                "interval_s": INTERVAL_S,
                "probe_successes": 2,
                "probe_healthy_s": 1.0,
                "half_open_growth": 2.0,
            },
        },
    )
    board = Switchboard.options(name=switchboard_name(name), namespace=ns).remote()
    try:
        ray.get(board.__ray_ready__.remote())
        fc = start_fleet(spec)
        ids: list[str] = []
        samples: list[tuple[float, dict[str, Any]]] = []

        def run_for(seconds: float, stop=lambda st: False) -> dict[str, Any]:
            """Submit RATE_PER_S tasks/s and sample the status every ~0.5 s."""
            t_end = time.time() + seconds
            st: dict[str, Any] = {}
            while time.time() < t_end:
                ids.extend(
                    fc.submit(
                        [
                            {"capability": "work", "payload": {"n": len(ids) + k}}
                            for k in range(RATE_PER_S // 2)
                        ]
                    ).accepted
                )
                st = fc.status()
                samples.append((time.time(), st))
                if stop(st):
                    break
                time.sleep(0.4)
            return st

        run_for(3.0)
        assert fc.wait(list(ids), timeout_s=60) == []
        seen = sorted({r.agent_id for r in fc.results(ids) if r is not None and r.agent_id})
        assert len(seen) >= BROKEN
        broken = seen[:: max(1, len(seen) // BROKEN)][:BROKEN]
        ray.get(
            board.add.remote(
                {
                    "kind": FAIL,
                    "start_unix_s": time.time(),
                    "until_unix_s": time.time() + 600,
                    "agents": broken,
                }
            )
        )
        t_fault = time.time()

        def guard(st: dict[str, Any]) -> dict[str, Any]:
            return st["health"]["guard"]

        run_for(FAULT_S)
        during = [(t, s) for t, s in samples if t > t_fault]
        opened = [(t, s) for t, s in during if guard(s)["state"] == "open"]
        assert opened, "the fleet breaker opened"
        alerted = [
            s
            for _, s in during
            if any(a["rule"] == CASCADE_ALERT for a in s["alerts"]["active"])
        ]
        assert alerted, "the cascade alert fired"
        worst = max(
            (s["pools"]["work"]["health"] for _, s in during),
            key=lambda h: h["unhealthy"] + h["restarting"],
        )
        assert worst["unhealthy"] + worst["restarting"] >= BROKEN // 2
        reasons = {
            f["reason"]
            for _, s in during
            for f in s["pools"]["work"]["health"]["last_failures"]
        }
        assert reasons and reasons <= {
            "error_rate",
            "heartbeat_missed",
            "crashed",
            "hung_task",
        }
        failed_ids = {
            f["agent_id"]
            for _, s in during
            for f in s["pools"]["work"]["health"]["last_failures"]
        }
        assert failed_ids <= set(broken), [
            f
            for _, s in during
            for f in s["pools"]["work"]["health"]["last_failures"]
            if f["agent_id"] not in broken
        ][:5]
        # Throttled as configured: while open, at most RESTARTS_PER_INTERVAL permits per
        # INTERVAL_S (the guard's sliding log), and restarts were refused.
        t_open, first = opened[0]
        last = samples[-1][1]
        granted_open = guard(last)["granted"] - guard(first)["granted"]
        span = samples[-1][0] - t_open
        assert granted_open <= RESTARTS_PER_INTERVAL * (span / INTERVAL_S + 1), (
            granted_open,
            span,
        )
        assert guard(last)["throttled"] > 0
        print("fault:", {"broken": broken, "worst": worst, "guard": guard(last)})
        print(_human(last))
        assert "ALERT critical: agent_cascade" in _human(last)

        # The fault is removed: restarts succeed, the breaker closes, the alert clears.
        ray.get(board.clear.remote())
        t_fix = time.time()

        def recovered(st: dict[str, Any]) -> bool:
            h = st["pools"]["work"]["health"]
            return (
                guard(st)["state"] == "closed"
                and not st["alerts"]["active"]
                and h["healthy"] == CASCADE_AGENTS
            )

        st = run_for(45.0, stop=recovered)
        assert recovered(st), (st["health"], st["pools"]["work"]["health"])
        print(f"recovered {time.time() - t_fix:.1f}s after the fault was removed")
        events = st["alerts"]["events"]
        assert [e["kind"] for e in events if e["rule"] == CASCADE_ALERT][-2:] == [
            "fired",
            "cleared",
        ]

        # Tasks succeed again, on the restarted agents too; nothing lost.
        # Restarted agents take work again. Their breakers may still be open after the
        # restart (a restart does not reset them: they earn their way back through
        # probe calls), so keep traffic coming, in rounds, until one of them serves.
        after: list[str] = []

        def a_restarted_agent_serves() -> bool:
            """One round of 100 tasks; True once a restarted agent ran one of them."""
            batch = fc.submit(
                [
                    {"capability": "work", "payload": {"after": len(after) + k}}
                    for k in range(100)
                ]
            ).accepted
            after.extend(batch)
            fc.wait(batch, timeout_s=90)
            served = {r.agent_id for r in fc.results(after) if r is not None}
            assert served & set(broken), ("no restarted agent took work", guard(fc.status()))
            return True

        eventually(a_restarted_agent_serves, 60, 1.0, what="a restarted agent serving")
        assert fc.wait(ids + after, timeout_s=90) == []
        late = fc.results(after)
        assert all(r is not None and r.status == "completed" for r in late)
        s = fc.summary(ids + after)
        assert s["lost"] == 0 and s["completed"] + s["failed"] == len(ids) + len(after)
        print("tasks:", {k: s[k] for k in ("completed", "failed", "lost")})
        # The gauges follow the hosts' periodic reports: give them a few ticks (and
        # Ray's metrics export a second).
        want = f'ray_fleet_agents{{pool="work",state="healthy"}} == {CASCADE_AGENTS}'

        def gauges_caught_up() -> str:
            text = fc.metrics_text()
            healthy = scrape.total(
                text, "ray_fleet_agents", pool="work", state="healthy", fleet=fc.spec.name
            )
            assert healthy == CASCADE_AGENTS, [
                ln for ln in text.splitlines() if ln.startswith("ray_fleet_agents{")
            ]
            return text

        text = eventually(gauges_caught_up, 15, 0.5, what=want)
        failing = ("unhealthy", "restarting")
        assert (
            sum(
                scrape.total(
                    text, "ray_fleet_agents", pool="work", state=s, fleet=fc.spec.name
                )
                for s in failing
            )
            == 0
        )
    finally:
        ray.kill(board)
