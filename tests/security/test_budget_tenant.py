"""The tenant a budget reservation is made for: the key's (from the scoped id) for a
task of the HTTP ingress, whatever its payload says; the payload's for a task of a
trusted in-cluster client. The host alone, no Ray."""

from __future__ import annotations

import asyncio

from fleet.runtime.budget_client import Grant
from fleet.runtime.host import AgentHost
from fleet.task import item_to_task, to_item
from tests.utils import pool


class Budget:
    def __init__(self) -> None:
        self.tenants: list[str | None] = []

    async def reserve(self, agent_id: str, pool_name: str, tenant: str | None) -> Grant:
        self.tenants.append(tenant)
        return Grant("r-1")


def test_the_budget_tenant_of_an_ingress_task_is_its_keys():
    host = AgentHost(pool("work", agents_per_host=2, autoscaling={"max_agents": 2}))
    budget = Budget()
    host.budget = budget
    forged = to_item(
        {"capability": "work", "id": "t1", "payload": {"tenant": "someone-else"}},
        {"work"},
        tenant="acme",
    )
    trusted = to_item({"capability": "work", "payload": {"tenant": "team-x"}}, {"work"})
    plain = to_item({"capability": "work", "payload": {}}, {"work"})

    async def run() -> None:
        for it in (forged, trusted, plain):
            got = await host.gate.acquire(it, item_to_task(it), None)
            assert isinstance(got, tuple)
            host.core.release(got[0])

    asyncio.run(run())
    assert budget.tenants == ["acme", "team-x", None]
