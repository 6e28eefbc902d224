"""Start a fleet's actors and Serve apps on a Ray cluster, or tear them down."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util.placement_group import placement_group, remove_placement_group

from fleet.observability.logs import serve_logging_options
from fleet.observability.metrics import TenantLabels
from fleet.policy.bulkhead import ShardBulkhead
from fleet.queue.storage import check_writable, fleet_directory
from fleet.runtime.budget_actor import BudgetActor
from fleet.runtime.controller import Controller
from fleet.runtime.dispatcher import Dispatcher
from fleet.runtime.host import AgentHost
from fleet.runtime.kafka_intake_actor import KafkaIntakeActor
from fleet.runtime.ledger import Ledger
from fleet.runtime.lifecycle import STORAGE_RESOURCE_SLIVER, control_actor_options
from fleet.runtime.names import Names
from fleet.runtime.queue_actor import QueueShard
from fleet.spec.fleet import FleetSpec
from fleet.spec.pools import PoolSpec
from fleet.spec.queues import StorageBackend

LOOPBACK = "127.0.0.1"
HOST_METRICS_INTERVAL_S = 1.0
# How often a removed host checks whether its last batch has finished (Serve's default
# of 2 s would keep every drained host, and its agents, around that much longer).
HOST_DRAIN_CHECK_S = 0.5


def host_deployment_options(spec: FleetSpec, pool: PoolSpec) -> dict[str, Any]:
    """Serve deployment options for a pool's hosts: fleet's autoscaling policy and router."""
    start_hosts = pool.hosts_for(pool.autoscaling.start_agents)
    min_hosts = pool.hosts_for(pool.autoscaling.min_agents)
    return {
        "name": Names.host_deployment(pool.name),
        "max_ongoing_requests": max(100, pool.agents_per_host * pool.concurrency_per_agent),
        "ray_actor_options": {
            "num_cpus": pool.cpus_per_host,
            "num_gpus": pool.gpus_per_host,
            **({"runtime_env": pool.runtime_env} if pool.runtime_env else {}),
        },
        # Each host's CPU/GPU is reserved in its own placement group, placed before the
        # host (and so its agents) starts; with max_hosts_per_node, by the host itself
        # (Serve refuses a placement group together with max_replicas_per_node).
        **(
            {"max_replicas_per_node": pool.max_hosts_per_node}
            if pool.max_hosts_per_node
            else {
                "placement_group_bundles": [pool.host_bundle],
                "placement_group_strategy": pool.placement_strategy,
            }
            if pool.host_bundle
            else {}
        ),
        # Scale-down: Serve stops routing to the host it removes, waits until the
        # host's batches are done (checking every HOST_DRAIN_CHECK_S), and stops it
        # after host_drain_timeout_s at the latest; the dispatcher then nacks what it
        # still held, so that work is redelivered (see fleet.runtime.dispatcher).
        "graceful_shutdown_wait_loop_s": HOST_DRAIN_CHECK_S,
        "graceful_shutdown_timeout_s": pool.host_drain_timeout_s,
        "autoscaling_config": {
            "min_replicas": min_hosts,
            "initial_replicas": start_hosts,
            "max_replicas": max(pool.max_hosts, min_hosts),
            "metrics_interval_s": HOST_METRICS_INTERVAL_S,
            "look_back_period_s": 2 * HOST_METRICS_INTERVAL_S,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 0.0,  # fleet's policy already rate-limits scale-down
            "policy": {
                "policy_function": "fleet.runtime.serve_autoscaling:desired_hosts_policy"
            },
        },
        "request_router_config": RequestRouterConfig(
            request_router_class="fleet.runtime.serve_router:FleetRequestRouter",
            request_router_kwargs={
                "router": pool.routing.router.value,
                "choices_d": pool.routing.choices_d,
                "capacity_per_host": pool.agents_per_host * pool.concurrency_per_agent,
            },
            request_routing_stats_period_s=1.0,
        ),
        # Serve's own logs of the hosts in the fleet's log format (fleet's loggers
        # follow the job's logging config: fleet.runtime.client.init_ray).
        **serve_logging_options(spec.observability.log_format),
    }


class PoolUnschedulable(RuntimeError):
    """The cluster cannot place a pool's starting hosts (a clear status, not a hang)."""


def check_placeable(spec: FleetSpec, pool: PoolSpec) -> None:
    """Reserve the pool's starting hosts at once, as a probe, then release the probe.

    Serve would otherwise wait forever for replicas that cannot be placed. The probe
    asks for every starting host's bundle in one placement group with the pool's
    strategy, and fails with the arithmetic if it is not placed within
    ``placement_timeout_s``.
    """
    if not pool.host_bundle:
        return
    hosts = pool.hosts_for(pool.autoscaling.start_agents)
    pg = placement_group(
        [pool.host_bundle] * hosts,
        strategy=pool.placement_strategy,
        name=f"{spec.name}.{pool.name}.probe",
    )
    try:
        if not pg.wait(timeout_seconds=pool.placement_timeout_s):
            want = {k: v * hosts for k, v in pool.host_bundle.items()}
            have = {k: ray.cluster_resources().get(k, 0.0) for k in want}
            free = {k: ray.available_resources().get(k, 0.0) for k in want}
            raise PoolUnschedulable(
                f"pool {pool.name!r} is unschedulable: {hosts} host(s) x {pool.host_bundle} "
                f"= {want} ({pool.placement_strategy}) could not be placed within "
                f"{pool.placement_timeout_s:g}s; the cluster has {have}, {free} free. "
                "Lower cpus_per_host/gpus_per_host or min_agents, or add nodes."
            )
    finally:
        remove_placement_group(pg)


def start_serve(http_port: int = 8000, http: bool = False) -> None:
    """Start Serve, listening on loopback only (no HTTP proxy unless asked for)."""
    serve.start(
        proxy_location="HeadOnly" if http else "Disabled",
        http_options={"host": LOOPBACK, "port": http_port},
    )


def deploy_pool(spec: FleetSpec, pool: PoolSpec) -> None:
    """Run (or update) one pool's Serve app of hosts; blocks until it is running.

    ``deploy`` calls this for every pool; ``fleet.serve_app`` calls it to bring back a
    pool whose app was deleted while the fleet's actors kept running.
    """
    names = Names(spec.name)
    ns = spec.namespace
    app = (
        serve.deployment(AgentHost)
        .options(**host_deployment_options(spec, pool))
        .bind(
            pool.model_dump(mode="json"),
            spec.resilience.model_dump(mode="json"),
            {k: v.model_dump() for k, v in spec.budgets.prices.items()},
            (names.controller, ns),
            (spec.name, ns, spec.results.ledger_shards),
            spec.health.model_dump(mode="json"),
            (names.budget, ns) if spec.budgets.enforced else None,
            spec.results.max_output_bytes,
            spec.observability.model_dump(mode="json"),
            sorted(spec.budgets.tenants),
        )
    )
    serve.run(app, name=names.pool_app(pool.name), route_prefix=None)


STORAGE_PROBE_TIMEOUT_S = 120.0


@ray.remote(num_cpus=0)
def _check_writable_on(directory: str) -> None:
    check_writable(directory)


class StorageNodeMissing(RuntimeError):
    """No live node of the cluster can hold the fleet's files (``queues.storage.node``)."""


def check_storage_node(resource: str, node: str) -> None:
    """Fail at once, naming the setting, when no live node has the storage node's
    resource (the actors would otherwise wait forever to be placed)."""
    have = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource, 0) > 0]
    if not have:
        raise StorageNodeMissing(
            f"queues.storage.node is {node!r}, but no live node of this cluster has the "
            f"resource {resource!r}: start the node that holds the storage directory "
            f"with `ray start --resources '{{\"{resource}\": 1}}'`, or use 'head'"
        )


def check_storage(spec: FleetSpec) -> None:
    """Before anything is created: a storage node is up and the storage directory can
    be written there (the actors would otherwise fail one by one, deep in Ray, or wait
    forever to be placed). Nothing to check for the memory backend."""
    storage = spec.queues.storage
    if storage.backend is not StorageBackend.SQLITE:
        return
    check_storage_node(storage.node_resource, storage.node)
    directory = str(fleet_directory(storage, spec.namespace, spec.name))
    probe = _check_writable_on.options(
        resources={storage.node_resource: STORAGE_RESOURCE_SLIVER}
    )
    try:
        ray.get(probe.remote(directory), timeout=STORAGE_PROBE_TIMEOUT_S)
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None


def storage_options(spec: FleetSpec, detached: bool) -> Callable[..., dict[str, Any]]:
    """``opts(name, pinned=True)``: Ray options for the fleet's control actor ``name``;
    ``pinned`` ones (those that hold files) go to the storage node."""
    storage = spec.queues.storage
    on_disk = storage.backend is StorageBackend.SQLITE
    node_resource = storage.node_resource if on_disk else None

    def opts(name: str, pinned: bool = True) -> dict[str, Any]:
        return control_actor_options(
            name,
            spec.namespace,
            detached=detached,
            node_resource=node_resource if pinned else None,
        )

    return opts


def deploy(spec: FleetSpec, *, detached: bool = False, http: bool = False) -> list[Any]:
    """Create the ledger shards, queue shards, pool hosts, dispatcher, controller and,
    with ``queues.kafka``, the Kafka intake consumers.

    Every one of them restarts when its process dies and recovers its state from the
    fleet's storage (``fleet.runtime.lifecycle``). Those that hold files run on the node
    that holds them (``queues.storage.node``: the head by default). Returns the
    actor handles. Unless ``detached``, the actors live only as long as a handle does,
    so the caller keeps this list for the fleet's lifetime.
    """
    names = Names(spec.name)
    ns = spec.namespace
    # Before anything is created: a storage directory that cannot be written, or no
    # node to hold it, fails here, naming it, on the node where the actors would write.
    check_storage(spec)
    opts = storage_options(spec, detached)
    start_serve(http=http)
    for pool in spec.pools:  # before anything is created: fail fast, leave nothing behind
        check_placeable(spec, pool)
    spec_json = spec.model_dump(mode="json")
    ledgers = [
        Ledger.options(**opts(names.ledger_shard(i))).remote(spec_json, i)
        for i in range(spec.results.ledger_shards)
    ]
    # Budgets are enforced by one actor that every host reserves from; a fleet without
    # budgets has none and its hosts never ask.
    budget = (
        [BudgetActor.options(**opts(names.budget)).remote(spec_json)]
        if spec.budgets.enforced
        else []
    )
    queue_spec = spec.queues.model_dump(mode="json")
    shards = [
        # A restarted shard reloads its storage (with the sqlite backend, the default,
        # nothing accepted is lost; memory restarts empty) and re-adopts the leases the
        # dispatcher holds (see fleet.runtime.queue_actor).
        QueueShard.options(**opts(names.shard(cap, i))).remote(
            cap,
            i,
            queue_spec,
            spec.resilience.max_deliveries,
            names.ledger,
            ns,
            spec.name,
            spec.results.ledger_shards,
            spec.pool_for(cap).name,
            sorted(TenantLabels.of_spec(spec).known),
            ShardBulkhead.of(
                spec.bulkheads, spec.pool_for(cap).name, spec.queues.shards, i
            ).to_json(),
        )
        for cap in spec.capabilities
        for i in range(spec.queues.shards)
    ]
    # Names register asynchronously: wait until the actors exist before anything looks
    # them up by name.
    ray.get([a.__ray_ready__.remote() for a in [*ledgers, *budget, *shards]])
    ray.get([b.start.remote() for b in budget])
    controller = Controller.options(**opts(names.controller)).remote(spec_json)
    ray.get(controller.__ray_ready__.remote())
    for pool in spec.pools:
        deploy_pool(spec, pool)
    # The dispatcher holds nothing on disk (its leases live in the shards), so it may
    # run anywhere.
    dispatcher = Dispatcher.options(**opts(names.dispatcher, pinned=False)).remote(spec_json)
    ray.get(dispatcher.start.remote())
    ray.get(controller.start.remote())
    intakes = []
    if spec.queues.kafka is not None:
        # Consumers last: what they consume has somewhere to go. A consumer that dies is
        # restarted and rejoins the group; its uncommitted messages are redelivered.
        intakes = [
            KafkaIntakeActor.options(**opts(names.kafka_intake(i), pinned=False)).remote(
                spec_json, i
            )
            for i in range(spec.queues.kafka.consumers)
        ]
        ray.get([a.__ray_ready__.remote() for a in intakes])
    return [*ledgers, *budget, *shards, controller, dispatcher, *intakes]


def teardown(spec: FleetSpec) -> None:
    """Stop and remove everything ``deploy`` created (idempotent)."""
    names = Names(spec.name)
    ns = spec.namespace
    intakes = [
        names.kafka_intake(i)
        for i in range(spec.queues.kafka.consumers if spec.queues.kafka else 0)
    ]
    stoppable = [*intakes, names.controller, names.dispatcher, names.budget]
    actor_names = [*stoppable, *(n for n in names.control_actors(spec) if n not in stoppable)]
    # Intake first (it commits what the ledger holds and leaves its group), then the
    # loops that move work and the budget actor.
    for name in stoppable:
        try:
            ray.get(ray.get_actor(name, namespace=ns).stop.remote(), timeout=10)
        except Exception:
            pass
    for pool in spec.pools:
        try:
            serve.delete(names.pool_app(pool.name))
        except Exception:
            pass
    for name in [*actor_names, names.ratelimit]:
        try:
            ray.kill(ray.get_actor(name, namespace=ns))
        except ValueError:
            pass
