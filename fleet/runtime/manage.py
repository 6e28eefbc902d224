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
flows to new pools and none to removed ones); the Kafka consumers when pools come or
go; last, the removed pools' hosts and shards. A removed pool must have an empty
queue: its shards are closed to new tasks and found empty before anything changes
(refused otherwise, and opened again). A refusal changes nothing. Only a detached
fleet (``fleet run --detach``, a Serve config) is changed in place: the actors apply
makes are detached, and must not outlive a foreground ``fleet run`` that owns the rest.

With ``queues.storage.backend: memory`` the replaced controller and budget actor start
afresh (agent counts, spend), as a crash would restart them: memory state dies with
its actor.

Not atomic: resources (the storage node, the new pools' placement) are checked first,
but a step that fails later leaves the steps before it done. Running the same ``fleet
apply`` again carries on (new shards are reused, ``serve.run`` and the replacements are
idempotent). An HTTP ingress deployed from a Serve config reads the capabilities when
its replicas start: redeploy the config after adding or removing a pool.

``stop`` tears the fleet down (``fleet.runtime.deploy.teardown``); its queue and
outcomes stay in its storage directory, so the next ``fleet run`` of the spec resumes
the queued tasks. ``drain=True`` first waits (up to ``timeout_s``) until nothing is
queued or running.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from fleet.observability.metrics import TenantLabels
from fleet.runtime.lifecycle import actor_states
from fleet.runtime.names import Names
from fleet.spec.changes import Plan, plan
from fleet.spec.fleet import FleetSpec

NAME_FREE_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 120.0
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
    _kill(name, namespace)
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
    ray.get(actor.__ray_ready__.remote(), timeout=READY_TIMEOUT_S)
    return actor


def apply(new: FleetSpec) -> dict[str, Any]:
    """Change the running fleet ``new.name`` to ``new``; what changed. ``ApplyRefused``
    (nothing changed) names every field that cannot change in place."""
    from ray import serve

    from fleet.policy.bulkhead import ShardBulkhead
    from fleet.runtime.budget_actor import BudgetActor
    from fleet.runtime.client import FleetClient
    from fleet.runtime.controller import Controller
    from fleet.runtime.deploy import (
        check_placeable,
        check_storage,
        deploy_pool,
        storage_options,
    )
    from fleet.runtime.dispatcher import Dispatcher
    from fleet.runtime.kafka_intake_actor import KafkaIntakeActor
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
    names, ns = Names(new.name), new.namespace
    detached = actor_states(ns, [names.controller])[names.controller].get("detached")
    if not p.refused and not p.noop and not detached:
        p.refused.append(
            "the fleet is not detached: its actors live as long as the process that "
            "started it, and those apply makes would outlive it; run it with "
            "`fleet run --detach` (or from a Serve config) to change it in place"
        )
    if p.refused:
        raise ApplyRefused("; ".join(p.refused))
    if p.noop:
        return _report(p)
    # Everything that can fail for want of resources fails before anything changes.
    check_storage(new)
    for pool in new.pools:
        if pool.name in p.added:
            check_placeable(new, pool)
    # A removed pool's shards take nothing more; one that still holds a task (one
    # accepted since the check above) is opened again and the apply refused.
    closing = [sh for name in p.removed for sh in fc._shards[old_pools[name].capability]]
    if closing:
        left = sum(ray.get([sh.close.remote() for sh in closing], timeout=READY_TIMEOUT_S))
        if left:
            ray.get([sh.close.remote(False) for sh in closing], timeout=READY_TIMEOUT_S)
            raise ApplyRefused(
                f"{left} task(s) of the pools to remove arrived meanwhile; nothing changed"
            )
    # Detached: the actors made here must outlive this process (``fleet apply`` exits);
    # ``fleet stop`` (or the driver of a foreground ``fleet run``) stops them by name.
    opts = storage_options(new, detached=True)
    new_json = new.model_dump(mode="json")
    queue_spec = new.queues.model_dump(mode="json")
    shards = [
        # get_if_exists: an apply interrupted after this step can simply be run again.
        QueueShard.options(**opts(names.shard(pool.capability, i)), get_if_exists=True).remote(
            pool.capability,
            i,
            queue_spec,
            new.resilience.max_deliveries,
            names.ledger,
            ns,
            new.name,
            new.results.ledger_shards,
            pool.name,
            sorted(TenantLabels.of_spec(new).known),
            ShardBulkhead.of(new.bulkheads, pool.name, new.queues.shards, i).to_json(),
        )
        for pool in new.pools
        if pool.name in p.added
        for i in range(new.queues.shards)
    ]
    ray.get([s.__ray_ready__.remote() for s in shards], timeout=READY_TIMEOUT_S)
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
    ray.get(dispatcher.start.remote(), timeout=READY_TIMEOUT_S)
    ray.get(controller.start.remote(), timeout=READY_TIMEOUT_S)
    if new.queues.kafka is not None and (p.added or p.removed):
        # The consumers route messages by capability: they learn the new pools the way
        # a crash would restart them (uncommitted messages are consumed again).
        for i in range(new.queues.kafka.consumers):
            _replace(
                names.kafka_intake(i),
                ns,
                lambda i=i: KafkaIntakeActor.options(
                    **opts(names.kafka_intake(i), pinned=False)
                ).remote(new_json, i),
            )
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
    deadline = time.monotonic() + timeout_s
    while True:
        queued = sum(_pending(fc, cap) for cap in fc.spec.capabilities)
        if not drain:
            break
        if queued == 0 or time.monotonic() > deadline:
            drained = queued == 0
            break
        time.sleep(POLL_S * 5)
    fc.shutdown()
    return {
        "fleet": name,
        "namespace": namespace,
        "state": "stopped",
        "drained": drained,
        "left_queued": queued,
    }
