"""Changing and stopping a running fleet: ``apply`` and ``stop`` (``fleet apply``,
``fleet stop``).

``apply`` carries out ``fleet.spec.changes.plan``. Each actor that reads a changed
setting is replaced the way a crash would replace it, a path the durability tests kill
their way through: the controller carries on from its control store, the dispatcher
adopts its predecessor's leases from the shards, the budget actor reloads its store,
and Serve replaces a pool's hosts one by one, each draining its batches like a
scale-down. So nothing accepted is lost across a change. In order: queue shards for new
capabilities; the new and changed pools' hosts (``serve.run`` returns once the rolling
update is done); the budget actor; the controller; the dispatcher (from then on work
flows to new pools and none to removed ones); last, the removed pools' hosts and
shards. A removed pool must have an empty queue (refused otherwise, before anything
changes). A refusal changes nothing.

``stop`` tears the fleet down (``fleet.runtime.deploy.teardown``); its queue and
outcomes stay in its storage directory, so the next ``fleet run`` of the spec resumes
the queued tasks. ``drain=True`` first waits (up to ``timeout_s``) until nothing is
queued or running.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from fleet.runtime.names import Names
from fleet.spec.changes import Plan, plan
from fleet.spec.fleet import FleetSpec

NAME_FREE_TIMEOUT_S = 60.0
POLL_S = 0.2


class ApplyRefused(ValueError):
    """The new spec cannot be applied in place; nothing was changed."""


def _pending(fc: Any, capability: str) -> int:
    """Tasks queued or running for ``capability`` (from its shards)."""
    return sum(
        s["depth"] + s["leased"]
        for s in ray.get([sh.stats.remote() for sh in fc._shards[capability]], timeout=30)
    )


def _replace(name: str, namespace: str, make: Any) -> Any:
    """Kill the actor ``name`` (no restart) and create its successor with ``make()``
    once the name is free."""
    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:
        pass  # gone already
    deadline = time.monotonic() + NAME_FREE_TIMEOUT_S
    while True:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor {name} did not go within {NAME_FREE_TIMEOUT_S:g}s")
        time.sleep(POLL_S)
    actor = make()
    ray.get(actor.__ray_ready__.remote())
    return actor


def apply(new: FleetSpec) -> dict[str, Any]:
    """Change the running fleet ``new.name`` to ``new``; what changed. ``ApplyRefused``
    (nothing changed) names every field that cannot change in place."""
    from ray import serve

    from fleet.runtime.budget_actor import BudgetActor
    from fleet.runtime.client import FleetClient
    from fleet.runtime.controller import Controller
    from fleet.runtime.deploy import check_placeable, deploy_pool, storage_options
    from fleet.runtime.dispatcher import Dispatcher
    from fleet.runtime.queue_actor import QueueShard

    fc = FleetClient.connect(new.name, new.namespace)
    old = fc.spec
    old_pools = {pool.name: pool for pool in old.pools}
    p = plan(old, new)
    if not p.refused:
        for name in p.removed:
            cap = old_pools[name].capability
            if (n := _pending(fc, cap)) > 0:
                p.refused.append(
                    f"pools.{name}: cannot be removed while {n} of its tasks are queued "
                    "or running; let them finish first"
                )
    if p.refused:
        raise ApplyRefused("; ".join(p.refused))
    if p.noop:
        return _report(p)
    names, ns = Names(new.name), new.namespace
    for pool in new.pools:  # placeable before anything changes
        if pool.name in p.added:
            check_placeable(new, pool)
    # Detached: the actors made here must outlive this process (``fleet apply`` exits);
    # ``fleet stop`` (or the driver of a foreground ``fleet run``) stops them by name.
    opts = storage_options(new, detached=True)
    new_json = new.model_dump(mode="json")
    queue_spec = new.queues.model_dump(mode="json")
    shards = [
        QueueShard.options(**opts(names.shard(pool.capability, i))).remote(
            pool.capability,
            i,
            queue_spec,
            new.resilience.max_deliveries,
            names.ledger,
            ns,
            new.name,
            new.results.ledger_shards,
        )
        for pool in new.pools
        if pool.name in p.added
        for i in range(new.queues.shards)
    ]
    ray.get([s.__ray_ready__.remote() for s in shards])
    for pool in new.pools:
        if pool.name in p.added or pool.name in p.rolled:
            deploy_pool(new, pool)
    if p.budgets:
        if new.budgets.enforced:
            budget = _replace(
                names.budget,
                ns,
                lambda: BudgetActor.options(**opts(names.budget)).remote(new_json),
            )
            ray.get(budget.start.remote())
        else:
            _kill(names.budget, ns)
    controller = _replace(
        names.controller,
        ns,
        lambda: Controller.options(**opts(names.controller)).remote(new_json, True),
    )
    dispatcher = _replace(
        names.dispatcher,
        ns,
        lambda: Dispatcher.options(**opts(names.dispatcher, pinned=False)).remote(
            new_json, True
        ),
    )
    ray.get(dispatcher.start.remote())
    ray.get(controller.start.remote())
    for name in p.removed:
        pool = old_pools[name]
        try:
            serve.delete(names.pool_app(name))
        except Exception:
            pass
        for i in range(old.queues.shards):
            _kill(names.shard(pool.capability, i), ns)
    return _report(p)


def _kill(name: str, namespace: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:
        pass


def _report(p: Plan) -> dict[str, Any]:
    return {
        "changed": p.changed,
        "pools_added": p.added,
        "pools_removed": p.removed,
        "hosts_replaced": p.rolled,
    }


def stop(
    name: str, namespace: str, drain: bool = False, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Stop the fleet ``name``; with ``drain``, once nothing is queued or running (or
    ``timeout_s`` passed: ``drained`` says which). Its queue and outcomes stay on disk."""
    from fleet.runtime.client import FleetClient

    fc = FleetClient.connect(name, namespace)
    drained = None
    if drain:
        deadline = time.monotonic() + timeout_s
        while True:
            left = sum(_pending(fc, cap) for cap in fc.spec.capabilities)
            if left == 0:
                drained = True
                break
            if time.monotonic() > deadline:
                drained = False
                break
            time.sleep(POLL_S * 5)
    queued = sum(_pending(fc, cap) for cap in fc.spec.capabilities)
    fc.shutdown()
    return {
        "fleet": name,
        "namespace": namespace,
        "state": "stopped",
        "drained": drained,
        "left_queued": queued,
    }
