"""Chaos harness: attack a running fleet on purpose and log every injection.

Use ``ChaosHarness(fc, plan)`` against any ``FleetClient`` (a fleet started here or one
joined with ``FleetClient.connect``), in tests and from ``fleet chaos``. It runs in a
background thread between ``start()`` and ``stop()``; ``report()`` returns the log.
``chaos_run`` pours tasks into a fleet under a harness and accounts for every one of
them from the ledger.

What each injection does, and what it models:
- ``kill``: ``ray.kill`` a share of the pool's hosts (Serve replicas) at random
  intervals: a crashed host process. Serve replaces it; the dispatcher nacks the batch
  the host held, so its work is redelivered. The harness measures each wave's
  kill-to-replacement time: until as many replicas as it killed, created after the
  kill, are RUNNING in Serve's replica states.
- ``hang``: chosen agents hold every task until the hang ends: a stuck agent. The
  host's watchdog fails the task with reason ``timeout`` and the retry policy sends it
  back to the queue.
- ``latency``: a share of the pool's agents add ``latency_s`` to every task: a slow
  dependency.
- ``partition``: every agent of the pool holds its tasks until the partition heals: the
  pool is cut off from the dispatcher (work sent to it gets no answer; the dispatcher
  keeps renewing the leases, so nothing is redelivered while the pool is only late).
  It does not cut the network: it models what the dispatcher sees.
- ``cpu``: busy-loop Ray tasks (``num_cpus=0``, so the scheduler places them anyway)
  saturate the cores for a while: a noisy neighbour.

Hang, latency and partition need the pool to run ``fleet.agents.chaotic.ChaoticAgent``
pointed at this fleet's switchboard (``chaotic_agent_kwargs``); kills and CPU burns work
on any pool. Everything is bounded: by ``duration_s``, by ``max_kill_waves`` and
``max_hosts_killed``, and by each injection's own duration. The schedule comes from a
``random.Random(seed)``, so a plan replays the same way (which hosts die depends on
what is alive then, chosen by the same generator).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray
from pydantic import Field, model_validator

from fleet.spec._base import SpecModel
from fleet.stats import RECOVERY_POST_WINDOW_S, recovery_s

REPLICA_PREFIX = "SERVE_REPLICA::"
POLL_S = 0.2
DEFAULT_KILL_INTERVAL_MIN_S = 2.0
DEFAULT_KILL_INTERVAL_MAX_S = 5.0
DEFAULT_REPLACEMENT_TIMEOUT_S = 60.0


class ChaosPlan(SpecModel):
    """What to inject into one pool, when and how much. Times are seconds from start.

    Kill waves start at ``kill_start_s`` and follow each other after a random interval
    in [``kill_interval_min_s``, ``kill_interval_max_s``]; each kills ``kill_share`` of
    the pool's live hosts (at least one). 0 turns an injection off (``kill_share``,
    ``hang_agents``, ``latency_share``, ``partition_duration_s``, ``cpu_burn_workers``).
    With ``spare_hung_hosts`` the kills spare the hosts of hung agents while the hang
    lasts, so the hang is observed through the watchdog and not ended by a kill.
    """

    pool: str
    seed: int = 0
    duration_s: float = Field(default=60.0, gt=0)
    kill_share: float = Field(default=0.1, ge=0, le=1)
    kill_start_s: float = Field(default=3.0, ge=0)
    kill_interval_min_s: float = Field(default=DEFAULT_KILL_INTERVAL_MIN_S, gt=0)
    kill_interval_max_s: float = Field(default=DEFAULT_KILL_INTERVAL_MAX_S, gt=0)
    max_kill_waves: int = Field(default=10, ge=0)
    max_hosts_killed: int = Field(default=100, ge=0)
    hang_agents: int = Field(default=0, ge=0)
    hang_at_s: float = Field(default=1.0, ge=0)
    hang_duration_s: float = Field(default=10.0, gt=0)
    spare_hung_hosts: bool = True
    latency_share: float = Field(default=0.0, ge=0, le=1)
    latency_s: float = Field(default=0.05, ge=0)
    latency_at_s: float = Field(default=1.0, ge=0)
    latency_duration_s: float = Field(default=10.0, gt=0)
    partition_at_s: float = Field(default=10.0, ge=0)
    partition_duration_s: float = Field(default=0.0, ge=0)
    cpu_burn_workers: int = Field(default=0, ge=0)
    cpu_burn_at_s: float = Field(default=5.0, ge=0)
    cpu_burn_duration_s: float = Field(default=3.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ChaosPlan:
        if self.kill_interval_max_s < self.kill_interval_min_s:
            raise ValueError(
                f"kill_interval_max_s ({self.kill_interval_max_s}) must be >= "
                f"kill_interval_min_s ({self.kill_interval_min_s})"
            )
        return self


@dataclass(frozen=True, slots=True)
class Planned:
    """One scheduled injection: seconds from the start and its kind."""

    t_s: float
    kind: str


def plan_schedule(plan: ChaosPlan, rng: random.Random) -> list[Planned]:
    """The injections of ``plan`` in time order (pure: the same seed, the same list)."""
    out: list[Planned] = []
    if plan.kill_share > 0 and plan.max_hosts_killed > 0:
        t = plan.kill_start_s
        waves = 0
        while t < plan.duration_s and waves < plan.max_kill_waves:
            out.append(Planned(t, "kill"))
            waves += 1
            t += rng.uniform(plan.kill_interval_min_s, plan.kill_interval_max_s)
    for kind, on, at in (
        ("hang", plan.hang_agents > 0, plan.hang_at_s),
        ("latency", plan.latency_share > 0, plan.latency_at_s),
        ("partition", plan.partition_duration_s > 0, plan.partition_at_s),
        ("cpu", plan.cpu_burn_workers > 0, plan.cpu_burn_at_s),
    ):
        if on and at < plan.duration_s:
            out.append(Planned(at, kind))
    out.sort(key=lambda p: p.t_s)
    return out


def switchboard_name(fleet: str) -> str:
    return f"{fleet}.chaos"


def chaotic_agent_kwargs(fleet: str, namespace: str, delay_s: float = 0.0) -> dict[str, Any]:
    """``agent_kwargs`` for a pool of ``ChaoticAgent`` that obeys this fleet's harness."""
    return {
        "delay_s": delay_s,
        "switchboard": switchboard_name(fleet),
        "switchboard_namespace": namespace,
    }


def pool_replicas(fleet: str, pool: str) -> list[tuple[str, str]]:
    """(actor name, namespace) of the live Serve replicas hosting ``pool``, sorted."""
    from fleet.runtime.names import Names

    prefix = f"{REPLICA_PREFIX}{Names(fleet).pool_app(pool)}#{Names.host_deployment(pool)}#"
    return sorted(
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )


def _replica_id(actor_name: str) -> str:
    """The replica's unique id, the last part of its actor name (and of host ids)."""
    return actor_name.rsplit("#", 1)[-1]


def replica_states(fleet: str, pool: str) -> dict[str, str] | None:
    """Serve's state (``RUNNING``, ``STARTING``, ...) of each of the pool's replicas by
    replica id (None: Serve did not answer). Reads the Serve controller's instance
    details, the source of the dashboard's replica table."""
    from ray.serve.context import _get_global_client

    from fleet.runtime.names import Names

    try:
        details = _get_global_client().get_serve_details()
        app = details["applications"][Names(fleet).pool_app(pool)]
        dep = app["deployments"][Names.host_deployment(pool)]
        return {
            r["replica_id"]: str(getattr(r["state"], "value", r["state"]))
            for r in dep.get("replicas", [])
        }
    except Exception:
        return None


def running_hosts(fleet: str, pool: str) -> int | None:
    """The pool's RUNNING replica count as Serve reports it (None: unknown)."""
    from ray import serve

    from fleet.runtime.names import Names

    try:
        app = serve.status().applications.get(Names(fleet).pool_app(pool))
        dep = app.deployments.get(Names.host_deployment(pool)) if app else None
        return int(dep.replica_states.get("RUNNING", 0)) if dep else None
    except Exception:
        return None


@ray.remote(num_cpus=0)
def _burn_cpu(until_unix_s: float) -> int:
    """Spin until ``until_unix_s``; returns the loop count (bounded by time alone)."""
    n = 0
    while time.time() < until_unix_s:
        for _ in range(10_000):
            n += 1
    return n


@dataclass(slots=True)
class _Wave:
    """A kill wave waiting for Serve to replace its hosts."""

    index: int
    t_unix_s: float
    killed: list[str]
    before: set[str]  # replica ids alive when it struck
    running_before: int
    replaced_unix_s: float | None = None


class ChaosHarness:
    """Runs a ``ChaosPlan`` against a fleet in a background thread.

    ``start()`` begins the schedule; ``stop()`` ends it early (or after it ran out),
    withdraws the switchboard's rules and waits for killed hosts to be replaced (up to
    ``replacement_timeout_s``); ``report()`` returns the injection log and the
    kill-to-replacement times. ``injections`` is the log: one dict per injection with
    ``t_s`` (seconds since start), ``unix_s``, ``kind`` and what was hit.
    """

    def __init__(
        self,
        fc: Any,
        plan: ChaosPlan,
        replacement_timeout_s: float = DEFAULT_REPLACEMENT_TIMEOUT_S,
    ):
        if plan.pool not in {p.name for p in fc.spec.pools}:
            raise ValueError(
                f"plan.pool {plan.pool!r} is not a pool of fleet "
                f"{fc.spec.name!r} (pools: {[p.name for p in fc.spec.pools]})"
            )
        self.fc = fc
        self.plan = plan
        self.fleet = fc.spec.name
        self.namespace = fc.spec.namespace
        self.replacement_timeout_s = replacement_timeout_s
        self._rng = random.Random(plan.seed)
        self.schedule = plan_schedule(plan, self._rng)
        self.injections: list[dict[str, Any]] = []
        self._waves: list[_Wave] = []
        self._claimed: set[str] = set()
        self._first_seen: dict[str, float] = {}  # replica id -> when a check first saw it
        self._killed_total = 0
        self._burns: list[Any] = []
        self._killed_ids: set[str] = set()
        self._spared: set[str] = set()  # replica ids the kills leave alone, until:
        self._spared_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.switchboard: Any = None  # the Switchboard actor, from start()
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> ChaosHarness:
        from fleet.agents.chaotic import Switchboard

        self.switchboard = Switchboard.options(
            name=switchboard_name(self.fleet), namespace=self.namespace, get_if_exists=True
        ).remote()
        ray.get(self.switchboard.__ray_ready__.remote())
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, name="fleet-chaos", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait_replacement: bool = True) -> dict[str, Any]:
        """End the injections and, if asked, wait for every killed host's replacement."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            ray.get(self.switchboard.clear.remote())
        except Exception:
            pass
        deadline = time.monotonic() + (self.replacement_timeout_s if wait_replacement else 0)
        while self._pending() and time.monotonic() < deadline:
            self._check_replacements()
            time.sleep(POLL_S)
        for ref in self._burns:
            try:
                ray.get(ref, timeout=self.plan.cpu_burn_duration_s + 10)
            except Exception:
                pass
        return self.report()

    def run_for(self, seconds: float) -> dict[str, Any]:
        """Start, inject for ``seconds`` (or until the plan's ``duration_s``), stop."""
        self.start()
        try:
            self._stop.wait(min(seconds, self.plan.duration_s))
        finally:
            report = self.stop()
            self.shutdown()
        return report

    def shutdown(self) -> None:
        """Remove the switchboard actor."""
        try:
            ray.kill(self.switchboard)
        except Exception:
            pass

    def __enter__(self) -> ChaosHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.shutdown()

    # -- the schedule --------------------------------------------------------------
    def _run(self) -> None:
        k = 0
        end = self._t0 + self.plan.duration_s
        while not self._stop.is_set() and time.time() < end:
            now_s = time.time() - self._t0
            while k < len(self.schedule) and self.schedule[k].t_s <= now_s:
                try:
                    getattr(self, f"_do_{self.schedule[k].kind}")()
                except Exception as exc:  # one failed injection must not end the run
                    self._log("error", planned=self.schedule[k].kind, error=repr(exc))
                k += 1
            self._check_replacements()
            self._stop.wait(POLL_S)

    def _log(self, kind: str, **what: Any) -> dict[str, Any]:
        now = time.time()
        entry = {"t_s": round(now - self._t0, 3), "unix_s": now, "kind": kind, **what}
        with self._lock:
            self.injections.append(entry)
        return entry

    def _add_rule(self, kind: str, duration_s: float, **target: Any) -> int:
        now = time.time()
        return ray.get(
            self.switchboard.add.remote(
                {"kind": kind, "start_unix_s": now, "until_unix_s": now + duration_s, **target}
            )
        )

    def _do_kill(self) -> None:
        """Kill ``kill_share`` of the pool's hosts that Serve reports RUNNING.

        Victims come from Serve's replica states, not from the named-actor list alone: a
        killed replica's name can outlive it briefly, and killing a dead host again
        would log a kill that Serve never has to repair.
        """
        plan = self.plan
        # Credit replacements first, and never kill a replacement no wave has been
        # credited with yet: killing it would leave its wave waiting for a host that
        # Serve did replace.
        self._check_replacements()
        names = {_replica_id(n): (n, ns) for n, ns in pool_replicas(self.fleet, plan.pool)}
        states = replica_states(self.fleet, plan.pool)
        self._seen([*names, *(states or {})])
        running = sorted(r for r, st in (states or {}).items() if st == "RUNNING")
        left = plan.max_hosts_killed - self._killed_total
        spared = self._spared if time.time() < self._spared_until else set()
        uncredited = {
            r
            for w in self._pending()
            for r in running
            if r not in w.before and r not in self._claimed
        }
        targets = [
            r
            for r in running
            if r in names
            and r not in spared
            and r not in self._killed_ids
            and r not in uncredited
        ]
        if not targets or left <= 0:
            return
        k = min(len(targets), left, max(1, round(plan.kill_share * len(running))))
        victims = self._rng.sample(targets, k)
        t = time.time()
        for r in victims:
            try:
                ray.kill(ray.get_actor(*names[r]), no_restart=True)
            except ValueError:
                pass  # died meanwhile: Serve replaces it all the same
        self._killed_total += k
        self._killed_ids.update(victims)
        wave = _Wave(
            len(self._waves), t, victims, set(names) | set(states or {}), len(running)
        )
        self._waves.append(wave)
        self._log(
            "kill",
            pool=plan.pool,
            hosts=victims,
            hosts_running_before=len(running),
            wave=wave.index,
        )

    def _do_hang(self) -> None:
        plan = self.plan
        alive = pool_replicas(self.fleet, plan.pool)
        if not alive:
            return
        pool_spec = next(p for p in self.fc.spec.pools if p.name == plan.pool)
        per_host = max(
            1,
            min(
                pool_spec.agents_per_host,
                math.ceil(pool_spec.autoscaling.min_agents / len(alive)),
            ),
        )
        hosts = [self._rng.choice(alive) for _ in range(plan.hang_agents)]
        if plan.spare_hung_hosts:
            self._spared = {_replica_id(n) for n, _ in hosts}
            self._spared_until = time.time() + plan.hang_duration_s
        agents = sorted(
            {f"{plan.pool}/{_replica_id(n)}/{self._rng.randrange(per_host)}" for n, _ in hosts}
        )
        rid = self._add_rule("hang", plan.hang_duration_s, agents=agents)
        self._log(
            "hang", pool=plan.pool, agents=agents, duration_s=plan.hang_duration_s, rule=rid
        )

    def _do_latency(self) -> None:
        plan = self.plan
        rid = self._add_rule(
            "latency",
            plan.latency_duration_s,
            prefix=f"{plan.pool}/",
            share=plan.latency_share,
            extra_s=plan.latency_s,
        )
        self._log(
            "latency",
            pool=plan.pool,
            share=plan.latency_share,
            extra_s=plan.latency_s,
            duration_s=plan.latency_duration_s,
            rule=rid,
        )

    def _do_partition(self) -> None:
        plan = self.plan
        rid = self._add_rule("partition", plan.partition_duration_s, prefix=f"{plan.pool}/")
        self._log("partition", pool=plan.pool, duration_s=plan.partition_duration_s, rule=rid)

    def _do_cpu(self) -> None:
        plan = self.plan
        until = time.time() + plan.cpu_burn_duration_s
        self._burns += [_burn_cpu.remote(until) for _ in range(plan.cpu_burn_workers)]
        self._log("cpu", workers=plan.cpu_burn_workers, duration_s=plan.cpu_burn_duration_s)

    # -- replacement ---------------------------------------------------------------
    def _pending(self) -> list[_Wave]:
        return [w for w in self._waves if w.replaced_unix_s is None]

    def _check_replacements(self) -> None:
        """Mark waves whose hosts Serve has replaced, oldest first.

        A wave is replaced once as many replicas as it killed are RUNNING (per Serve's
        own replica states) that did not exist when it struck and that no earlier wave
        has been credited with. Crediting new replicas to waves in kill order keeps one
        replacement from counting for two waves, and per-replica states keep a later
        kill from hiding an earlier wave's replacement (a pool-wide RUNNING count would
        not be back to its target while kills keep coming). Among the new replicas a
        wave could take, it takes the ones seen first: a replica that already existed
        when a later wave struck is of no use to that wave, while a newer one may be the
        only replacement it can be credited with.
        """
        pending = self._pending()
        if not pending:
            return
        states = replica_states(self.fleet, self.plan.pool)
        if states is None:
            return
        now = time.time()
        self._seen(states)
        running = sorted(
            (r for r, st in states.items() if st == "RUNNING"),
            key=lambda r: (self._first_seen[r], r),
        )
        for w in pending:
            fresh = [r for r in running if r not in w.before and r not in self._claimed]
            if len(fresh) < len(w.killed):
                break
            self._claimed.update(fresh[: len(w.killed)])
            w.replaced_unix_s = now

    def _seen(self, replicas: Any) -> None:
        now = time.monotonic()
        for r in replicas:
            self._first_seen.setdefault(r, now)

    # -- report --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        kills = [
            {
                "wave": w.index,
                "t_s": round(w.t_unix_s - self._t0, 3),
                "unix_s": w.t_unix_s,
                "hosts": len(w.killed),
                "replaced_s": (
                    round(w.replaced_unix_s - w.t_unix_s, 3)
                    if w.replaced_unix_s is not None
                    else None
                ),
            }
            for w in self._waves
        ]
        times = [k["replaced_s"] for k in kills if k["replaced_s"] is not None]
        try:
            board = ray.get(self.switchboard.report.remote(), timeout=10)
        except Exception:
            board = {"hits": {}, "events": []}
        with self._lock:
            log = list(self.injections)
        return {
            "plan": self.plan.model_dump(),
            "injections": log,
            "injection_counts": dict(Counter(e["kind"] for e in log)),
            "kills": kills,
            "hosts_killed": sum(k["hosts"] for k in kills),
            "all_replaced": all(k["replaced_s"] is not None for k in kills),
            "replacement_s": {
                "max": max(times, default=0.0),
                "mean": round(sum(times) / len(times), 3) if times else 0.0,
            },
            "switchboard_hits": {str(k): v for k, v in board["hits"].items()},
            "held_tasks": board["events"],
        }


# -- throughput recovery -------------------------------------------------------------
def per_second(finish_unix_s: list[float], t0: float, t1: float) -> list[int]:
    """Outcomes finished in each whole second from ``t0`` up to ``t1``."""
    n = max(0, math.ceil(t1 - t0))
    counts = [0] * n
    for f in finish_unix_s:
        k = int(f - t0)
        if 0 <= k < n:
            counts[k] += 1
    return counts


def max_recovery(
    finish_unix_s: list[float],
    kill_unix_s: list[float],
    end_unix_s: float,
) -> tuple[float | None, list[float | None]]:
    """The longest recovery over the kills, and each kill's (None: not within the run).

    Each kill's is ``fleet.stats.recovery_s`` over outcomes per second (``per_second``
    from the first finish on), the definition the simulator's report uses too. Kills in
    the first second (nothing to compare with) or in the last ``RECOVERY_POST_WINDOW_S``
    seconds before the queue ran dry (``end_unix_s``: the drain ends throughput whatever
    the kill did) are skipped (None) and do not count.
    """
    if not finish_unix_s:
        return None, [None for _ in kill_unix_s]
    t0 = min(finish_unix_s)
    counts = per_second(finish_unix_s, t0, end_unix_s)
    out: list[float | None] = []
    for t in kill_unix_s:
        if t - t0 < 1 or end_unix_s - t < RECOVERY_POST_WINDOW_S + 1:
            out.append(None)
            continue
        r = recovery_s(counts, t - t0)
        out.append(round(r, 3) if r is not None else None)
    seen = [r for r in out if r is not None]
    return (max(seen) if seen else None), out


# -- a whole run ---------------------------------------------------------------------
def chaos_run(
    fc: Any,
    tasks: int,
    plan: ChaosPlan,
    *,
    payload: dict[str, Any] | None = None,
    wait_timeout_s: float = 600.0,
    progress: Any = None,
) -> dict[str, Any]:
    """Submit ``tasks`` tasks to ``plan.pool`` under a harness and account for each.

    Every figure comes from the ledger against the submitted ids: ``lost`` (ids with
    no outcome), ``recorded_twice`` (records beyond one per id: the ledger count of this
    fleet minus the ids it holds, 0 unless the ledger broke its invariant),
    ``duplicate_executions`` (executions after the first, counted by the ledger).
    """
    pool = next(p for p in fc.spec.pools if p.name == plan.pool)
    harness = ChaosHarness(fc, plan)
    ledger_before = fc.status()["ledger"]["recorded"]
    items, report = fc.validate(
        {"capability": pool.capability, "payload": payload or {}} for _ in range(tasks)
    )
    t_submit = time.time()
    fc.submit_items(items)
    ids = [it.id for it in items]
    # The injections are timed from when the work is queued, not from when queuing began:
    # on a loaded machine queuing 20,000 tasks takes seconds, and a hang or a latency
    # window that closed before the first task reached an agent would test nothing.
    harness.start()
    try:
        missing = fc.wait(ids, timeout_s=wait_timeout_s, progress=progress)
        t_done = time.time()
    finally:
        chaos = harness.stop()
        harness.shutdown()
    summary = fc.summary(ids)
    results = [r for r in fc.results(ids) if r is not None]
    finish = [r.finished_unix_s for r in results]
    ledger_after = fc.status()["ledger"]["recorded"]
    recorded_twice = (ledger_after - ledger_before) - len(results)
    # The queue ran dry when the last outcome of a submitted task came in.
    end = max(finish, default=t_done)
    worst, per_kill = max_recovery(finish, [k["unix_s"] for k in chaos["kills"]], end)
    for k, r in zip(chaos["kills"], per_kill):
        k["recovery_s"] = r
    held = {e["task_id"] for e in chaos["held_tasks"]}
    by_id = {r.task_id: r for r in results}
    return {
        "tasks": len(ids),
        "rejected": len(report.rejected),
        "completed": summary["completed"],
        "failed": summary["failed"],
        "failure_reasons": summary["failure_reasons"],
        "lost": summary["lost"],
        "missing": len(missing),
        "recorded": summary["recorded"],
        "recorded_twice": recorded_twice,
        "duplicate_executions": summary["duplicate_executions"],
        "redelivered_tasks": sum(1 for r in results if r.deliveries >= 2),
        "held_tasks": len(held),
        "held_tasks_unaccounted": len((held & set(ids)) - by_id.keys()),
        "wall_s": round(t_done - t_submit, 2),
        "throughput_tasks_per_s": round(len(ids) / max(t_done - t_submit, 1e-9), 1),
        "latency_s": {k: round(v, 4) for k, v in summary["latency_s"].items()},
        "injections": chaos["injections"],
        "injection_counts": chaos["injection_counts"],
        "kills": chaos["kills"],
        "hosts_killed": chaos["hosts_killed"],
        "all_replaced": chaos["all_replaced"],
        "replacement_s": chaos["replacement_s"],
        "kill_to_replacement_s": [k["replaced_s"] for k in chaos["kills"]],
        "max_recovery_s": worst,
        "switchboard_hits": chaos["switchboard_hits"],
        "_held_task_ids": sorted(held),
    }


__all__ = [
    "ChaosHarness",
    "ChaosPlan",
    "Planned",
    "chaos_run",
    "chaotic_agent_kwargs",
    "max_recovery",
    "per_second",
    "plan_schedule",
    "pool_replicas",
    "replica_states",
    "running_hosts",
    "switchboard_name",
]
