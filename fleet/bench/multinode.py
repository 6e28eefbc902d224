"""Multi-node: a fleet on a local cluster of a head and worker nodes, and what losing or
draining a node costs.

The cluster is Ray's own ``cluster_utils.Cluster``: every node a real raylet with its
own processes, all on loopback and all sharing this machine's cores. The head has no
CPU for hosts (``num_cpus=0``, as KubeRay recommends), so it runs only what holds the
fleet's files (queue shards, ledger, controller: ``queues.storage.node: head``) and
Serve's controller; the hosts run on the workers (``WORKER_CPUS`` logical CPUs each,
one per host), spread by Serve. GCS health checks are tightened (``HEALTH_CHECK``) so a
killed node is declared dead in about 3 s instead of 15 s (the default on a real cluster).

``node_loss`` runs three phases on one fleet, each on ``tasks`` sleep tasks submitted at
once (the queue stays deep, so the rate is the fleet's capacity):

1. ``crash``: once a third is recorded, worker 0 is killed (its raylet and every worker
   process, SIGKILL). Reported: ``lost`` (no outcome: must be 0),
   ``duplicate_executions`` (runs beyond the first, which the ledger absorbs: it keeps
   one outcome per task), the recorded count every
   ``SAMPLE_S`` (``samples``: seconds since the kill, count), the rate before the kill
   and in each ``RATE_WINDOW_S`` after it, hosts per node before and after, and
   ``hosts_back_s``: when every host ran again on the surviving nodes.
2. ``control``: once a third is recorded, queue shard 0 and the ledger are SIGKILLed;
   reported: the node each restarted on (``on_storage_node``: the head's) and ``lost``.
3. ``drain``: a fresh worker joins, then, once a third is recorded, worker 1 is drained
   through Ray's drain API (reason preemption, with a deadline): Serve moves its hosts
   to other nodes and stops them gracefully, each finishing the batches it holds.
   Reported: ``redelivered`` (outcomes recorded from a second or later delivery: must be
   0 when the drained hosts finish their work), ``lost``, hosts per node after.

``crossing`` measures the cost of crossing nodes: the same hosts on 1, 2 and 3 worker
nodes (a cluster each), ``tasks`` no-op tasks, tasks per second.

Figures only: nothing is asserted here; ``tests/runtime/test_multinode.py`` asserts on
``node_loss``'s report. Run as ``python -m fleet.bench.multinode`` (a cluster of its
own: not from a process already connected to Ray) or ``fleet bench multinode``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

NEEDS_RAY = False  # starts a cluster of its own

FULL_TASKS = 20_000
QUICK_TASKS = 3_000
WORKERS = 2
WORKER_CPUS = 6  # a survivor holds every host: the lost ones come back
HOSTS = 6
AGENTS_PER_HOST = 8
TASK_SLEEP_S = 0.02
KILL_AT_SHARE = 1 / 3
SAMPLE_S = 0.25
RATE_WINDOW_S = 10.0
PHASE_TIMEOUT_S = 600.0
HOSTS_BACK_TIMEOUT_S = 120.0
DRAIN_DEADLINE_S = 120
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
POOL = "work"


# --- the cluster -----------------------------------------------------------------------


@contextmanager
def local_cluster(workers: int, worker_cpus: int = WORKER_CPUS) -> Iterator[Any]:
    """A head (no CPU) and ``workers`` worker nodes on loopback, this process connected;
    shut down (every node's processes) on exit."""
    from fleet.runtime.client import loopback_only

    loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": HEALTH_CHECK,
        },
    )
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=worker_cpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def fleet_spec(directory: str, hosts: int = HOSTS, sleep_s: float = TASK_SLEEP_S) -> Any:
    from fleet.spec import parse_spec

    agents = hosts * AGENTS_PER_HOST
    return parse_spec(
        {
            "name": "multinode",
            "namespace": "fleet-multinode",
            "queues": {"shards": 2, "lease_s": 30, "storage": {"directory": directory}},
            "resilience": {"task_timeout_s": 60},
            "pools": [
                {
                    "name": POOL,
                    "capability": POOL,
                    "agent_class": "fleet.agents.testing:SleepAgent",
                    "agent_kwargs": {"delay_s": sleep_s},
                    "agents_per_host": AGENTS_PER_HOST,
                    "cpus_per_host": 1,
                    "autoscaling": {"min_agents": agents, "max_agents": agents},
                }
            ],
        }
    )


def _actors() -> list[dict[str, Any]]:
    from ray._private import state

    return list(state.actors().values())


def hosts_per_node() -> dict[str, int]:
    """ALIVE hosts (Serve replicas of the pool) per node id."""
    return dict(
        Counter(
            a["Address"]["NodeID"]
            for a in _actors()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica:")
        )
    )


def actor_node(name: str, namespace: str) -> str | None:
    """The node of the actor ``name`` if it is ALIVE."""
    from fleet.runtime.lifecycle import ALIVE, actor_states

    st = actor_states(namespace, [name])[name]
    return st["node_id"] if st["state"] == ALIVE else None


def _wait(cond: Any, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:g}s")
        time.sleep(SAMPLE_S)
    return time.monotonic() - t0


# --- one phase: submit, act at a third, wait for every outcome ------------------------


def _phase(fc: Any, tasks: int, tag: str, act: Any) -> dict[str, Any]:
    """Submit ``tasks`` (ids ``<tag>-<k>``), call ``act()`` once a third is recorded,
    sample the phase's recorded count until all are recorded; report."""
    ids = [f"{tag}-{k}" for k in range(tasks)]
    base = fc.ledger.count()
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    fc.submit([{"capability": POOL, "id": i, "payload": {}} for i in ids])
    acted_at: float | None = None
    acted: dict[str, Any] = {}
    while True:
        done = fc.ledger.count() - base
        now = time.monotonic() - t0
        samples.append((now, done))
        if acted_at is None and done >= tasks * KILL_AT_SHARE:
            acted_at = time.monotonic() - t0
            acted = act() or {}
        if done >= tasks:
            break
        if now > PHASE_TIMEOUT_S:
            break
        time.sleep(SAMPLE_S)
    summary = fc.summary(ids)
    results = fc.results(ids)
    at = acted_at or 0.0
    rel = [(round(t - at, 3), n) for t, n in samples]
    return {
        "tasks": tasks,
        "lost": sum(r is None for r in results),
        "redelivered": summary["redelivered"],
        "duplicate_executions": summary["duplicate_executions"],
        "wall_s": round(samples[-1][0], 2),
        "acted_at_s": round(at, 2),
        "rate_before": round(_rate(rel, -RATE_WINDOW_S, 0.0), 1),
        "rate_after": [
            round(_rate(rel, k * RATE_WINDOW_S, (k + 1) * RATE_WINDOW_S), 1)
            for k in range(int(max(0.0, rel[-1][0]) // RATE_WINDOW_S) + 1)
        ],
        "samples": rel,
        **acted,
    }


def _rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Outcomes per second between ``start`` and ``end`` (clipped to the samples)."""
    inside = [(t, n) for t, n in samples if start <= t <= end]
    if len(inside) < 2:
        return 0.0
    (ta, na), (tb, nb) = inside[0], inside[-1]
    return (nb - na) / (tb - ta) if tb > ta else 0.0


def _kill_pid(name: str, namespace: str) -> None:
    from fleet.runtime.lifecycle import actor_states

    pid = actor_states(namespace, [name])[name]["pid"]
    os.kill(pid, signal.SIGKILL)


def drain_node(node_id: str, deadline_s: float) -> bool:
    """Ask Ray to drain a node (as KubeRay or a spot-instance notice does: reason
    preemption, with a deadline); True if the GCS accepted it."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "fleet: node drain",
        int((time.time() + deadline_s) * 1000),
    )
    if not accepted:
        raise RuntimeError(f"drain of node {node_id} refused: {why}")
    return bool(accepted)


# --- the scenarios ----------------------------------------------------------------------


def node_loss(tasks: int = QUICK_TASKS, workers: int = WORKERS) -> dict[str, Any]:
    import ray

    from fleet.runtime.client import FleetClient
    from fleet.runtime.names import Names

    directory = tempfile.mkdtemp(prefix="fleet-multinode-")
    out: dict[str, Any] = {"workers": workers, "hosts": HOSTS, "tasks_per_phase": tasks}
    try:
        with local_cluster(workers) as cluster:
            head = ray.get_runtime_context().get_node_id()
            spec = fleet_spec(directory)
            names = Names(spec.name)
            fc = FleetClient.start(spec)
            _wait(lambda: sum(hosts_per_node().values()) >= HOSTS, 120, "hosts up")
            nodes = [n.node_id for n in cluster.worker_nodes]
            out["hosts_per_node_at_start"] = _by_index(hosts_per_node(), nodes, head)
            # Every actor that holds files (the dispatcher holds none and runs anywhere).
            holding = [n for n in names.control_actors(spec) if n != names.dispatcher]
            out["storage_actors"] = {
                n: ("head" if actor_node(n, spec.namespace) == head else "other")
                for n in holding
            }

            victim = cluster.list_all_nodes()[1]  # worker 0

            def crash() -> dict[str, Any]:
                cluster.remove_node(victim, allow_graceful=False)
                return {}

            crash_report = _phase(fc, tasks, "crash", crash)
            t_back = time.monotonic()
            alive = set(nodes[1:])
            try:
                _wait(
                    lambda: sum(n for k, n in hosts_per_node().items() if k in alive) >= HOSTS,
                    HOSTS_BACK_TIMEOUT_S,
                    "hosts back on the surviving nodes",
                )
                crash_report["hosts_back_s"] = round(
                    time.monotonic()
                    - t_back
                    + crash_report["wall_s"]
                    - crash_report["acted_at_s"],
                    1,
                )
            except TimeoutError as exc:
                crash_report["hosts_back_s"] = None
                crash_report["hosts_back_error"] = str(exc)
            crash_report["hosts_per_node_after"] = _by_index(hosts_per_node(), nodes, head)
            out["crash"] = crash_report

            shard, ledger = names.shard(POOL, 0), names.ledger

            def kill_control() -> dict[str, Any]:
                _kill_pid(shard, spec.namespace)
                _kill_pid(ledger, spec.namespace)
                return {}

            control = _phase(fc, tasks, "control", kill_control)
            control["restarted_on"] = {
                n: ("head" if actor_node(n, spec.namespace) == head else "other")
                for n in (shard, ledger)
            }
            control["on_storage_node"] = all(
                v == "head" for v in control["restarted_on"].values()
            )
            from fleet.runtime.lifecycle import actor_states

            control["restarts"] = {
                n: s["restarts"]
                for n, s in actor_states(spec.namespace, [shard, ledger]).items()
            }
            out["control"] = control

            fresh = cluster.add_node(num_cpus=WORKER_CPUS)
            cluster.wait_for_nodes()
            nodes.append(fresh.node_id)
            drained = nodes[1]

            def drain() -> dict[str, Any]:
                drain_node(drained, DRAIN_DEADLINE_S)
                return {}

            drain_report = _phase(fc, tasks, "drain", drain)
            drain_report["hosts_per_node_when_recorded"] = _by_index(
                hosts_per_node(), nodes, head
            )
            try:
                _wait(
                    lambda: (
                        hosts_per_node().get(drained, 0) == 0
                        and sum(hosts_per_node().values()) >= HOSTS
                    ),
                    HOSTS_BACK_TIMEOUT_S,
                    "hosts moved off the drained node",
                )
            except TimeoutError as exc:
                drain_report["hosts_moved_error"] = str(exc)
            drain_report["hosts_per_node_after"] = _by_index(hosts_per_node(), nodes, head)
            out["drain"] = drain_report
            fc.shutdown()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def _by_index(per_node: dict[str, int], workers: list[str], head: str) -> dict[str, int]:
    """Hosts per node, named ``head`` or ``worker<k>`` (in order of joining)."""
    label = {head: "head", **{n: f"worker{k}" for k, n in enumerate(workers)}}
    return {
        label.get(n, n[:8]): c
        for n, c in sorted(per_node.items(), key=lambda x: label.get(x[0], x[0]))
    }


def crossing(
    tasks: int = QUICK_TASKS, node_counts: tuple[int, ...] = (1, 2, 3)
) -> dict[str, Any]:
    """The same ``HOSTS`` hosts on 1, 2 and 3 worker nodes: no-op tasks per second."""
    from fleet.runtime.client import FleetClient

    rows = []
    for k in node_counts:
        directory = tempfile.mkdtemp(prefix="fleet-crossing-")
        try:
            with local_cluster(k, worker_cpus=-(-HOSTS // k)):
                fc = FleetClient.start(fleet_spec(directory, sleep_s=0.0))
                _wait(lambda: sum(hosts_per_node().values()) >= HOSTS, 120, "hosts up")
                ids = [f"x-{i}" for i in range(tasks)]
                t0 = time.monotonic()
                fc.submit([{"capability": POOL, "id": i, "payload": {}} for i in ids])
                fc.wait(ids, timeout_s=PHASE_TIMEOUT_S)
                wall = time.monotonic() - t0
                s = fc.summary(ids)
                rows.append(
                    {
                        "nodes": k,
                        "hosts_per_node": sorted(hosts_per_node().values()),
                        "tasks": tasks,
                        "lost": s["lost"],
                        "tasks_per_s": round(tasks / wall, 1),
                    }
                )
                fc.shutdown()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return {"rows": rows}


def run(
    quick: bool = False, tasks: int | None = None, plot: str | None = None
) -> dict[str, Any]:
    n = tasks or (QUICK_TASKS if quick else FULL_TASKS)
    load = os.getloadavg()[0]
    loss = node_loss(n)
    out = {
        "load_1m_at_start": round(load, 2),
        "node_loss": loss,
        "crossing": crossing(n),
        "lost": sum(loss[p]["lost"] for p in ("crash", "control", "drain")),
    }
    if plot:
        plot_node_loss(loss["crash"], plot)
        out["plot"] = plot
    return out


def plot_node_loss(crash: dict[str, Any], path: str) -> None:
    """Outcomes per second over time around the node loss (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = crash["samples"]
    step = 2.0
    ts, rates = [], []
    t = samples[0][0]
    while t + step <= samples[-1][0]:
        ts.append(t + step / 2)
        rates.append(_rate(samples, t, t + step))
        t += step
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(ts, rates, lw=1.5)
    ax.axvline(0.0, color="red", ls="--", label="worker node killed")
    if crash.get("hosts_back_s"):
        ax.axvline(crash["hosts_back_s"], color="green", ls=":", label="every host back")
    ax.set_xlabel("seconds since the node was killed")
    ax.set_ylabel("outcomes recorded per second")
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleet.bench.multinode", description=__doc__)
    p.add_argument(
        "scenario", choices=["node-loss", "crossing", "all"], default="all", nargs="?"
    )
    p.add_argument("--tasks", type=int, default=QUICK_TASKS)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.scenario == "node-loss":
        out: dict[str, Any] = node_loss(args.tasks)
        if args.plot:
            plot_node_loss(out["crash"], args.plot)
    elif args.scenario == "crossing":
        out = crossing(args.tasks)
    else:
        out = run(tasks=args.tasks, plot=args.plot)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
