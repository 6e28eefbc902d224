"""What `fleet apply` may change in place, and what it refuses, naming the field."""

from __future__ import annotations

from fleet.spec.changes import plan
from tests.utils import make_spec, pool


def _spec(**over):
    pools = over.pop("pools", None) or [
        pool("work", agent_kwargs={"delay_s": 0.01}),
        pool("other"),
    ]
    return make_spec(*pools, name="f", namespace="ns", **over)


def test_no_change_is_a_noop():
    p = plan(_spec(), _spec())
    assert p.noop and not p.refused and p.rolled == [] and p.added == []


def test_pool_changes_roll_that_pools_hosts_only():
    new = _spec(
        pools=[
            pool(
                "work",
                agent_kwargs={"delay_s": 0.5},
                autoscaling={"min_agents": 1, "max_agents": 9},
                routing={"router": "round_robin"},
            ),
            pool("other"),
        ]
    )
    p = plan(_spec(), new)
    assert not p.refused and p.rolled == ["work"]
    assert "pools.work.agent_kwargs.delay_s" in p.changed
    assert "pools.work.autoscaling.max_agents" in p.changed
    assert "pools.work.routing.router" in p.changed


def test_pools_added_and_removed():
    new = _spec(pools=[pool("work", agent_kwargs={"delay_s": 0.01}), pool("third")])
    p = plan(_spec(), new)
    assert (p.added, p.removed, p.refused) == (["third"], ["other"], [])


def test_host_wide_settings_roll_every_pool_and_alerts_apply_in_place():
    new = _spec(
        resilience={"task_timeout_s": 99},
        queues={"alerts": [{"metric": "depth", "op": ">", "threshold": 5}]},
    )
    p = plan(_spec(), new)
    assert p.refused == [] and p.rolled == ["other", "work"]


def test_what_decides_where_tasks_live_is_refused_naming_the_field():
    cases = {
        "queues.shards": _spec(queues={"shards": 7}),
        "queues.storage.directory": _spec(
            queues={"storage": {"backend": "memory", "directory": "elsewhere"}}
        ),
        "results.ledger_shards": _spec(results={"ledger_shards": 3}),
        "ingress.limits.tenant_burst": _spec(ingress={"limits": {"tenant_burst": 5}}),
        "resilience.max_deliveries": _spec(resilience={"max_deliveries": 9}),
        "bulkheads.tenant.max_queued": _spec(bulkheads={"tenant": {"max_queued": 50}}),
    }
    for field, new in cases.items():
        refused = plan(_spec(), new).refused
        assert len(refused) == 1 and refused[0].startswith(f"{field}: cannot change"), (
            field,
            refused,
        )
    moved = _spec(
        pools=[
            pool("work", capability="elsewhere", agent_kwargs={"delay_s": 0.01}),
            pool("other"),
        ]
    )
    (why,) = plan(_spec(), moved).refused
    assert why.startswith("pools.work.capability: cannot change in place")
    assert (
        plan(_spec(), make_spec(pool("work"), name="g", namespace="ns"))
        .refused[0]
        .startswith("name: cannot change")
    )


def test_what_the_budget_actor_reads_replaces_it():
    new = _spec(budgets={"prices": {"m": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 2}}})
    assert plan(_spec(), new).budgets
    assert plan(_spec(), _spec(resilience={"task_timeout_s": 99})).budgets
    assert plan(_spec(), _spec(pools=[pool("work", agent_kwargs={"delay_s": 0.01})])).budgets
    assert not plan(_spec(), _spec(queues={"alerts": []})).budgets
