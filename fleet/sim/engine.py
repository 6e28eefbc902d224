"""The discrete-event engine: virtual time, one heap of events, the real policies.

Per pool the engine keeps a FIFO queue, the agents (starting, serving, draining, dead)
and a dispatcher. The dispatcher takes ``fleet.policy.batching.batch_size`` items per
call and gives each to the agent that the pool's router (``fleet.policy.routing``, the
object the live runtime uses) picks; every ``control_interval_s`` the pool's autoscaler
(``fleet.policy.autoscaling.decide``) sets the number of agents, new agents serve after
their start-up time, and removed ones drain (finish what they run, take nothing new).
Outcomes feed the agents' circuit breakers and failures the retry policy
(``fleet.policy.breaker``, ``fleet.policy.retry``; see ``fleet.sim.resilience``).
Chaos and crashes kill agents: their work goes back to the queue's head and they
restart after a delay. Compute preemption (``fleet.sim.preemption``) cancels single runs
(``preempt``). Further policies plug in as ``Component`` hooks.

Speed (a million tasks, ten thousand agents, in seconds):
* events are plain tuples ``(t, seq, kind, a, b, c)`` on one ``heapq``; ``seq`` breaks
  ties in scheduling order, which makes runs deterministic. Arrivals, half of all
  events, wait on a separate heap of one entry per stream;
* a task is an integer index into flat arrays (submit time, pool, tenant, deliveries,
  outcome), never an object;
* the router sees only the agents with room (a list kept in O(1) per change by swap
  removal), so power-of-d routing costs O(d) per task, not O(agents);
* an event made stale (a completion on an agent killed since) is recognized by the
  agent's generation counter instead of being searched for in the heap;
* the autoscaler runs once per control interval, never per task.

Correctness of the accounting: every submitted task is, at any time, in exactly one of
the pool's queue, an agent's running list or local queue, a partition buffer, a retry
backoff, or recorded in ``outcome`` (once: a second outcome is counted in
``recorded_twice`` and dropped). Kills, ejections and preemptions move held work back
to the queue, so ``lost`` (tasks with no outcome at the end) is 0 whenever the run drains.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from fleet.policy.admission import LEVELS
from fleet.policy.autoscaling import ScalingInput, ScalingState, decide
from fleet.policy.batching import batch_size
from fleet.policy.host import CoreAgent, HostCore
from fleet.policy.routing import Candidate, RoutingHint, host_router
from fleet.sim.arrivals import TenantPicker, make_stream
from fleet.sim.chaos import schedule_chaos
from fleet.sim.components import (
    ACTIVE,
    DEAD,
    DRAINING,
    STARTING,
    STOPPED,
    Component,
    overrides,
)
from fleet.sim.distributions import count_sampler, duration_sampler
from fleet.sim.health import HealthRestarts
from fleet.sim.outcomes import ERROR, MAX_DELIVERIES, OK, TIMEOUT, VERDICT_CODES
from fleet.sim.overload import Overload, PoolGate, PriorityQueue, gates
from fleet.sim.preemption import PoolPreemption
from fleet.sim.report import build_report
from fleet.sim.resilience import SimBreakerLog
from fleet.sim.scenario import ConstantDuration, PoolModel, Scenario
from fleet.spec.queues import Discipline

# Event kinds, most frequent first (``run`` tests them in this order); arrivals have
# their own small heap.
(
    EV_DONE,
    EV_TIMEOUT,
    EV_READY,
    EV_RESTART,
    EV_CONTROL,
    EV_SAMPLE,
    EV_CRASH,
    EV_REQUEUE,
    EV_CALL,
) = range(9)


MAX_EVENT_LOG = 500
MAX_DELIVERIES_STORED = 255


class SimAgent(CoreAgent):
    """A logical agent: its host's ``HostCore`` keeps it as a ``CoreAgent`` (slots,
    breaker, routability), the engine adds its simulated life.

    ``in_flight`` counts the tasks it holds (running plus waiting in its local queue),
    ``capacity`` is concurrency plus the local queue limit. ``fail_p``: the share of its
    tasks that fail (the pool's, or a bad agent's).
    """

    __slots__ = (
        "base_factor",
        "factor",
        "fail_p",
        "gen",
        "host",
        "injection",
        "killed_at",
        "lidx",
        "local",
        "pool",
        "running",
        "state",
    )

    def __init__(
        self,
        agent_id: str,
        capacity: int,
        pool: PoolRun,
        host: SimHost,
        base_factor: float,
        local: bool,
    ):
        super().__init__(agent_id, -1, capacity)
        self.pool = pool
        self.host = host
        self.fail_p = pool.fail_p
        self.state = STARTING
        self.gen = 0
        self.base_factor = base_factor
        self.factor = base_factor
        self.running: list[int] = []
        self.local: deque[int] | None = deque() if local else None
        self.lidx = -1  # index in the list of its state (active/starting/dead), or -1
        self.killed_at = -1.0
        self.injection = -1

    def __repr__(self) -> str:
        return f"SimAgent({self.id!r}, state={self.state}, in_flight={self.in_flight})"


class SimHost(Candidate):
    """A simulated host (a Serve replica): up to ``agents_per_host`` agents in one
    ``HostCore``, the live host's decision core, with its own routing among its agents,
    breakers (and their ejection cap), retries and retry budget. As a ``Candidate`` the
    pool's host router (``fleet.policy.routing.host_router``, Serve's choice live) reads
    its load in place: ``in_flight`` is ``n``, the tasks its agents hold, ``capacity``
    that plus its free routable slots (both set by ``Simulation._sync`` after every
    change, plain attributes because the router reads them per task). ``fidx``: its
    place in ``PoolRun.free_hosts`` (-1: no free
    routable slot); ``oidx`` in ``PoolRun.open_hosts`` (-1: it has its
    ``agents_per_host`` agents).
    """

    __slots__ = ("core", "fidx", "firsts", "live", "n", "oidx", "pool", "recheck_at")

    def __init__(self, host_id: str, core: HostCore, pool: PoolRun):
        self.id = host_id
        self.pool = pool
        self.in_flight = 0
        self.capacity = 0
        self.latency_s = 0.0
        self.weight = 1.0
        self.expertise: frozenset[str] = frozenset()
        self.success_rate = None
        self.calls = 0
        self.core = core
        self.n = 0  # tasks its agents hold
        self.live = 0  # agents not stopped (starting, serving, draining, dead)
        self.fidx = -1
        self.oidx = -1
        self.firsts = 0  # first attempts not yet counted in its retry budget
        self.recheck_at = math.inf  # a refresh is scheduled then (see _recheck)

    def __repr__(self) -> str:
        return f"SimHost({self.id!r}, held={self.n}, live={self.live})"


class PoolRun:
    """The simulated state of one pool."""

    def __init__(
        self, idx: int, sim: Simulation, spec: Any, model: PoolModel | None, seed: str
    ):
        # A pool the scenario sends no work to needs no model; it idles at its minimum.
        model = model or PoolModel(service=ConstantDuration(kind="constant", value_s=0.0))
        self.idx = idx
        self.name: str = spec.name
        self.spec = spec
        self.model = model
        self.scaling = spec.autoscaling
        self.concurrency: int = spec.concurrency_per_agent
        self.capacity: int = spec.concurrency_per_agent + model.agent_queue_limit
        self.local_queues = model.agent_queue_limit > 0
        # FIFO, or by priority under the priority discipline when tasks have priorities.
        self.queue: Any = (
            PriorityQueue(sim.task_prio)
            if sim.prio_on and sim.scenario.fleet.queues.discipline is Discipline.PRIORITY
            else deque()
        )
        self.gate: Any = None  # a PoolGate when the run simulates overload
        self.preemption: PoolPreemption | None = None  # with pools[].preemption.enabled
        self.active: list[SimAgent] = []  # ACTIVE agents (routable or held out by breakers)
        self.starting: list[SimAgent] = []
        self.dead: list[SimAgent] = []  # waiting to restart
        self.n_draining = 0
        self.held = 0  # tasks held by agents (running or local)
        self.local_n = 0  # of which waiting in agents' local queues
        self.target: int = spec.autoscaling.start_agents
        self.scale_state = ScalingState()
        # The pool's agents live in hosts of up to agents_per_host agents, each with a
        # HostCore, the live host's decision core: slots, routing (with task hints and
        # outcome feedback), breakers and retries are its. The host router picks a host
        # for each dispatcher call among those with a free routable slot.
        self.breaker_log = SimBreakerLog(sim, self)
        self.agents_per_host: int = spec.agents_per_host
        self.hosts: list[SimHost] = []
        self.free_hosts: list[SimHost] = []
        self.open_hosts: list[SimHost] = []
        self.host_router = host_router(spec.routing)
        self.rng_hosts = random.Random(f"{seed}/hosts/{self.name}")
        self._core_args = (spec.routing, sim.scenario.fleet.resilience, sim.clock, seed)
        self.hinted = self._new_host().core.hinted
        self.capability: str = spec.capability
        self.rng_fail = random.Random(f"{seed}/fail/{self.name}")
        self.rng_agents = random.Random(f"{seed}/agents/{self.name}")
        self.rng_crash = random.Random(f"{seed}/crash/{self.name}")
        self.sample = duration_sampler(
            model.service, random.Random(f"{seed}/service/{self.name}")
        )
        self.startup = duration_sampler(model.startup, self.rng_agents)
        self.overhead: float = model.dispatch_overhead_s
        self.payload_bytes: float = float(model.payload_bytes)
        fails = model.failures
        self.fail_p: float = fails.task_failure_prob
        self.bad_share: float = fails.bad_agent_share
        self.bad_fail_p: float = fails.bad_agent_failure_prob
        self.experts: list[tuple[float, frozenset[str]]] = []  # cumulative share, types
        acc = 0.0
        for kind, share in model.experts.items():
            acc += share
            self.experts.append((acc, frozenset({kind})))
        self.restart_delay_s: float = fails.restart_delay_s
        # Crashes arrive at rate x max_agents and are thinned to live agents (_on_crash).
        self.crash_rate_per_s: float = (
            fails.crash_rate_per_agent_per_h / 3600.0 * self.scaling.max_agents
        )
        self.slow_share = model.heterogeneity.slow_share
        self.slowdown = model.heterogeneity.slowdown
        tok = model.tokens
        self.tokens = tok is not None
        if tok is not None:
            trng = random.Random(f"{seed}/tokens/{self.name}")
            self.in_tok = count_sampler(tok.input_tokens, trng)
            self.out_tok = count_sampler(tok.output_tokens, trng)
            price = sim.scenario.fleet.budgets.prices[tok.model]
            self.in_price = price.input_usd_per_mtok / 1e6
            self.out_price = price.output_usd_per_mtok / 1e6
        self.usd_per_agent_s: float = model.agent_usd_per_hour / 3600.0
        self.error_text: str = fails.error
        self.retry_wait = 0  # failed tasks waiting out their retry backoff
        self.partitioned = False
        self.partition_buffer: list[tuple[int, int]] = []
        self.n_created = 0
        # accounting (tasks submitted per pool: counted from Simulation.task_pool)
        self.completed = 0
        self.failed = 0
        self.requeued = 0
        self.calls = 0
        self.call_items = 0
        self.busy_s = 0.0
        self.alive_s = 0.0
        self.paid_s = 0.0
        self.acct_t = 0.0
        self.alive_max = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.token_usd = 0.0
        self.kills = 0
        self.crashes = 0
        self.restarts = 0
        self.replacements: list[float] = []
        self.lat = array("d")
        self.waits = array("d")
        self.arr_bucket = 0
        self.done_bucket = 0
        # series, one entry per sample
        self.s_t: list[float] = []
        self.s_target: list[int] = []
        self.s_serving: list[int] = []
        self.s_alive: list[int] = []
        self.s_starting: list[int] = []
        self.s_dead: list[int] = []
        self.s_queue: list[int] = []
        self.s_oldest: list[float] = []
        self.s_busy: list[int] = []
        self.s_arrivals: list[int] = []
        self.s_done: list[int] = []
        # autoscaler decisions, one per control tick
        self.c_t: list[float] = []
        self.c_target: list[int] = []
        self.c_raw: list[int] = []
        self.c_reasons: dict[str, int] = {}

    def _new_host(self) -> SimHost:
        routing, resilience, clock, seed = self._core_args
        host_id = f"{self.name}/h{len(self.hosts)}"
        core = HostCore(
            host_id,
            0,
            self.capacity,
            routing,
            resilience,
            None,
            clock=clock,
            rng=random.Random(f"{seed}/route/{host_id}"),
            listeners=[self.breaker_log],
        )
        h = SimHost(host_id, core, self)
        self.hosts.append(h)
        h.oidx = len(self.open_hosts)
        self.open_hosts.append(h)
        return h

    def host_for_new_agent(self) -> SimHost:
        """The host a new agent joins: the newest one with room, else a new host (as
        Serve adds a replica when the agents outgrow the hosts)."""
        if self.open_hosts:
            return self.open_hosts[-1]
        return self._new_host()

    def agents(self) -> list[SimAgent]:
        """Every agent ever created, host by host (stopped ones too)."""
        return [a for h in self.hosts for a in h.core.agents]  # type: ignore[misc]

    @property
    def alive(self) -> int:
        return len(self.active) + self.n_draining

    @property
    def busy(self) -> int:
        """Tasks running on agents now."""
        return self.held - self.local_n

    @property
    def serving(self) -> int:
        return len(self.active) - self.n_ejected

    @property
    def n_ejected(self) -> int:
        """Active agents the breakers hold out of routing (O(hosts))."""
        return sum(len(h.core.breakers.registry.ejected) for h in self.hosts)


def _van_der_corput(n: int) -> float:
    """The n-th point of the base-2 van der Corput sequence in [0, 1): every prefix of
    the sequence is spread evenly."""
    q, denom = 0.0, 1.0
    while n:
        denom *= 2
        n, bit = divmod(n, 2)
        q += bit / denom
    return q


# Swap removal of a host from ``free_hosts`` (per dispatch: written out, as the host
# core's own; see fleet.policy.host) and from ``open_hosts`` (per new agent: by name).
def _host_unfree(free: list[SimHost], h: SimHost) -> None:
    i = h.fidx
    last = free.pop()
    if last is not h:
        free[i] = last
        last.fidx = i
    h.fidx = -1


def _host_unopen(hosts: list[SimHost], h: SimHost) -> None:
    _swap_remove(hosts, h, "oidx")


def _swap_remove(lst: list[Any], x: Any, slot: str) -> None:
    """Remove ``x`` from ``lst`` in O(1): the last item takes its place; ``slot`` is
    the attribute holding each item's index in ``lst`` (-1: not there)."""
    i = getattr(x, slot)
    last = lst.pop()
    if last is not x:
        lst[i] = last
        setattr(last, slot, i)
    setattr(x, slot, -1)


def _list_add(lst: list[SimAgent], a: SimAgent) -> None:
    a.lidx = len(lst)
    lst.append(a)


def _list_remove(lst: list[SimAgent], a: SimAgent) -> None:
    i = a.lidx
    last = lst.pop()
    if last is not a:
        lst[i] = last
        last.lidx = i
    a.lidx = -1


class Simulation:
    """One run of a scenario. ``run()`` once, then read the state or ``report()``."""

    def __init__(
        self,
        scenario: Scenario,
        seed: int | None = None,
        components: Sequence[Component] = (),
        progress: Callable[[float, int], None] | None = None,
        default_components: bool = True,
    ):
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self._seed_key = f"fleet-sim/{self.seed}"
        # The caller's components first: where hooks compete (restart delay), they win.
        self.components = list(components) + (
            default_policy_components(scenario) if default_components else []
        )
        self._progress = progress
        self.now = 0.0
        self.events = 0
        self.wall_s = 0.0
        self._heap: list[tuple] = []
        # Next arrival per stream, apart from the main heap: arrivals are half of all
        # events, and a heap of a few entries is cheaper than one of ten thousand.
        self._arrivals: list[tuple[float, int]] = []
        self._seq = itertools.count()
        self._max_tasks = scenario.max_tasks or math.inf
        self._duration = scenario.duration_s if scenario.duration_s is not None else math.inf
        self._hard_end = math.inf
        self.warmup_s = scenario.warmup_s
        self.finished = False
        self.arrivals_done = False
        self.end_t = 0.0
        fleet = scenario.fleet
        self.batch_spec = fleet.queues.batch
        self.task_timeout_s = fleet.resilience.task_timeout_s
        self.max_deliveries = min(fleet.resilience.max_deliveries, MAX_DELIVERIES_STORED)
        # Priorities and deadlines per task (only when the workload gives them), and the
        # priority class of each priority (``budgets.priority_classes``).
        budgets = fleet.budgets
        self.class_names: list[str] = budgets.class_names
        self.class_of = bytes(
            self.class_names.index(budgets.class_of_task(q).name) for q in range(LEVELS)
        )
        self.prio_on = any(st.priorities for st in scenario.workload)
        self.deadline_on = any(st.deadline_s is not None for st in scenario.workload)
        self.task_prio = bytearray()
        self.task_deadline = array("d")
        self.offered = 0  # arrivals, admitted or not
        self.pools: list[PoolRun] = [
            PoolRun(i, self, spec, scenario.pools.get(spec.name), self._seed_key)
            for i, spec in enumerate(fleet.pools)
        ]
        self.pool_by_name = {p.name: p for p in self.pools}
        # Overload (``fleet.sim.overload``): priorities, deadlines, admission control and
        # degradation, only for the runs that have any of them.
        self.overload: Overload | None = None
        if self.prio_on or self.deadline_on or gates(fleet):
            self.overload = Overload(self)
            for p in self.pools:
                p.gate = PoolGate(self, p)
        self._gated = self.overload is not None and self.overload.gated
        # Compute preemption (``fleet.sim.preemption``): a check every period per pool
        # that enables it, nothing per task.
        for p in self.pools:
            if p.spec.preemption.enabled:
                p.preemption = PoolPreemption(self, p)
        self._stream_cls: list[tuple[Any, float, random.Random]] = []
        # per task
        self.submitted = 0
        self.recorded = 0
        self.recorded_twice = 0
        self.submit_t = array("d")
        self.start_t = array("d")
        self.task_pool = bytearray()
        self.task_tenant = array("H")
        self.deliveries = bytearray()
        self.outcome = bytearray()
        # tenants
        self.tenants: list[tuple[str, int]] = []  # (tenant name, pool index)
        self._tenant_index: dict[tuple[str, int], int] = {}
        self.ten_ok: list[int] = []
        self.ten_n: list[int] = []
        self.ten_lat: list[float] = []
        self.alive_total = 0
        self.agents_max = 0
        self.event_log: list[dict[str, Any]] = []
        self.event_counts: dict[str, int] = {}
        self.injections: list[dict[str, Any]] = []
        self._streams: list[tuple[Any, PoolRun, TenantPicker]] = []
        # Task types and affinity keys (for task-aware routers), only when a stream
        # names them: per task an index into ``kinds`` (0: untyped) and a key (-1: none).
        self.kinds: list[str | None] = [None]
        self.task_kinds = bytearray()
        self.task_keys = array("i")
        self._typed = any(st.task_types for st in scenario.workload)
        self._keyed = any(st.affinity_keys for st in scenario.workload)
        self._stream_hints: list[tuple[Any, Any, random.Random]] = []
        self._open_streams = 0
        self._outcome_hooks = [c for c in self.components if overrides(c, "on_outcome")]
        self._down_hooks = [c for c in self.components if overrides(c, "on_agent_down")]
        self._restart_hooks = [c for c in self.components if overrides(c, "restart_delay_s")]
        self._gate_hooks = [c for c in self.components if overrides(c, "restart_gate_s")]
        self._up_hooks = [c for c in self.components if overrides(c, "on_agent_up")]
        self._gone_hooks = [c for c in self.components if overrides(c, "on_agent_gone")]
        self._tick_hooks = [c for c in self.components if overrides(c, "on_tick")]

    # -- helpers for components and chaos --------------------------------------------
    def clock(self) -> float:
        """Virtual time: the clock of every policy object the simulation runs."""
        return self.now

    def rng(self, name: str) -> random.Random:
        """A seeded random stream of its own for ``name`` (components, chaos)."""
        return random.Random(f"{self._seed_key}/{name}")

    def _push(self, t: float, kind: int, a: Any = None, b: Any = 0, c: Any = 0) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b, c))

    def schedule(self, t: float, fn: Callable[[float], None]) -> None:
        """Call ``fn(now_s)`` at virtual time ``t``."""
        self._push(max(t, self.now), EV_CALL, fn)

    def log_event(self, kind: str, **fields: Any) -> None:
        """Count an event by kind; the first ``MAX_EVENT_LOG`` are kept in detail."""
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        if len(self.event_log) < MAX_EVENT_LOG:
            self.event_log.append({"t_s": self.now, "kind": kind, **fields})

    def _tenant_id(self, name: str, pool: PoolRun) -> int:
        """Index of tenant ``name`` within ``pool`` (a tenant is counted per pool)."""
        key = (name, pool.idx)
        if key not in self._tenant_index:
            self._tenant_index[key] = len(self.tenants)
            self.tenants.append(key)
            for lst in (self.ten_ok, self.ten_n):
                lst.append(0)
            self.ten_lat.append(0.0)
        return self._tenant_index[key]

    # -- set-up ------------------------------------------------------------------------
    def _setup(self) -> None:
        sc = self.scenario
        for i, st in enumerate(sc.workload):
            pool = self.pool_by_name[st.pool]
            rng = random.Random(f"{self._seed_key}/arrivals/{i}")
            stream = make_stream(st, rng, self._duration)
            names = list(st.tenants) or [st.pool]
            weights = list(st.tenants.values()) or [1.0]
            picker = TenantPicker(
                [self._tenant_id(n, pool) for n in names],
                weights,
                random.Random(f"{self._seed_key}/tenants/{i}"),
            )
            self._streams.append((stream, pool, picker))
            kinds = None
            if st.task_types:
                idx = []
                for name in st.task_types:
                    if name not in self.kinds:
                        self.kinds.append(name)
                    idx.append(self.kinds.index(name))
                cum = list(itertools.accumulate(st.task_types.values()))
                kinds = (idx, cum)
            self._stream_hints.append(
                (kinds, st.affinity_keys or None, random.Random(f"{self._seed_key}/hints/{i}"))
            )
            prios = None
            if st.priorities:
                prios = (
                    list(st.priorities),
                    list(itertools.accumulate(st.priorities.values())),
                )
            self._stream_cls.append(
                (
                    prios,
                    math.inf if st.deadline_s is None else st.deadline_s,
                    random.Random(f"{self._seed_key}/priorities/{i}"),
                )
            )
            first = stream.next_after(0.0)
            if first is not None and first <= self._duration:
                self._open_streams += 1
                heapq.heappush(self._arrivals, (first, i))
        if self._open_streams == 0:
            self._arrivals_over(0.0)
        for c in self.components:
            c.attach(self)
        if self.overload is not None:
            self.overload.start()
        for p in self.pools:
            if p.preemption is not None:
                p.preemption.start()
            for _ in range(p.target):
                a = self._new_agent(p)
                a.state = STARTING
                _list_add(p.starting, a)
                self._ready(a, 0.0)  # the fleet is up when the scenario starts
            self._push(p.scaling.control_interval_s, EV_CONTROL, p)
            if p.crash_rate_per_s > 0:
                self._push(p.rng_crash.expovariate(p.crash_rate_per_s), EV_CRASH, p)
        self._push(sc.sample_interval_s, EV_SAMPLE)
        schedule_chaos(self)

    def _new_agent(self, p: PoolRun) -> SimAgent:
        slow = p.slow_share > 0 and p.rng_agents.random() < p.slow_share
        h = p.host_for_new_agent()
        a = SimAgent(
            f"{h.id}/{len(h.core.agents)}",  # as live: the host's id, then the index
            p.capacity,
            p,
            h,
            p.slowdown if slow else 1.0,
            p.local_queues,
        )
        # Bad agents and experts by a low-discrepancy sequence of the creation order, so
        # that any number of agents has the scenario's shares as closely as it can.
        u = _van_der_corput(p.n_created)
        p.n_created += 1
        if u < p.bad_share:
            a.fail_p = p.bad_fail_p
        for upto, kinds in p.experts:
            if u < upto:
                a.expertise = kinds
                break
        h.core.add_agent(a)
        h.live += 1
        if h.live >= p.agents_per_host:
            _host_unopen(p.open_hosts, h)
        return a

    def _gone(self, a: SimAgent) -> None:
        """Agent ``a`` left the pool for good (stopped): its host has room again."""
        h = a.host
        h.live -= 1
        if h.oidx < 0:
            h.oidx = len(a.pool.open_hosts)
            a.pool.open_hosts.append(h)

    def _sync(self, h: SimHost) -> None:
        """After a change on host ``h``'s core: ``h`` is in its pool's ``free_hosts``
        iff it has a free routable slot, and a refresh is scheduled for when an open
        breaker of its turns half-open (nothing else may wake a host whose agents are
        all held out). O(1)."""
        core = h.core
        slots = core.slots
        h.in_flight = n = h.n
        h.capacity = n + slots.free_slots
        if slots.free:
            if h.fidx < 0:
                free = h.pool.free_hosts
                h.fidx = len(free)
                free.append(h)
        elif h.fidx >= 0:
            _host_unfree(h.pool.free_hosts, h)
        t = core.next_recheck_s
        if t < h.recheck_at:
            h.recheck_at = t
            self.schedule(t, lambda now: self._on_recheck(h, now))

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> Simulation:
        """Run to the end: every task has an outcome, or the drain timeout passed."""
        wall0 = time.perf_counter()
        self._setup()
        heap, arrivals = self._heap, self._arrivals
        pop = heapq.heappop
        done = self._on_done
        arrival = self._on_arrival
        n = 0
        progress = self._progress
        next_progress = 0
        while not self.finished:
            # Arrivals come first at equal times (a fixed rule: runs stay deterministic).
            if arrivals and (not heap or arrivals[0][0] <= heap[0][0]):
                t, i = arrivals[0]
                if t > self._hard_end:
                    break
                pop(arrivals)
                self.now = t
                n += 1
                arrival(i, t)
                continue
            if not heap:
                break
            t, _, kind, a, b, c = pop(heap)
            if t > self._hard_end:
                break
            self.now = t
            n += 1
            if kind == EV_DONE:
                done(a, b, c, t, OK)
            elif kind == EV_TIMEOUT:
                done(a, b, c, t, TIMEOUT)
            elif kind == EV_READY:
                if a.gen == b and a.state == STARTING:
                    self._ready(a, t)
            elif kind == EV_RESTART:
                if a.gen == b and a.state == DEAD:
                    self._restart_due(a, t)
            elif kind == EV_CONTROL:
                self._on_control(a, t)
            elif kind == EV_SAMPLE:
                self._on_sample(t)
                if progress is not None and n >= next_progress:
                    progress(t, self.submitted)
                    next_progress = n + 200_000
            elif kind == EV_CRASH:
                self._on_crash(a, t)
            elif kind == EV_REQUEUE:
                a.retry_wait -= 1
                a.queue.append(b)
                if a.free_hosts:
                    self._dispatch(a, t)
            elif kind == EV_CALL:
                a(t)
        self.events = n
        self._finish()
        self.wall_s = time.perf_counter() - wall0
        return self

    def _finish(self) -> None:
        end = self.now if self.finished else min(self.now, self._hard_end)
        self.end_t = end
        for p in self.pools:
            self._account(p, end)
        if not self.pools[0].s_t or self.pools[0].s_t[-1] < end:
            self._on_sample(end)

    # -- arrivals ----------------------------------------------------------------------
    def _arrivals_over(self, t: float) -> None:
        self.arrivals_done = True
        self._hard_end = t + self.scenario.drain_timeout_s
        if self.recorded == self.submitted:
            self.finished = True

    def _on_arrival(self, i: int, t: float) -> None:
        if self.offered >= self._max_tasks:
            return  # another stream reached the cap first; this one is closed already
        self.offered += 1
        stream, p, picker = self._streams[i]
        ten = picker.single
        if ten is None:
            ten = picker.pick()
        if self.overload is not None:
            prios, rel, crng = self._stream_cls[i]
            prio = 0
            if prios is not None:
                prio = prios[0][bisect.bisect_right(prios[1], crng.random() * prios[1][-1])]
            deadline = t + rel
            cls = self.class_of[prio]
            if self._gated:
                q = self.overload.admit(p, prio, deadline, cls, ten)
                if q is None:  # refused at the door: never queued
                    self._next_arrival(i, stream, t)
                    return
                p = q
            else:
                p.gate.offered[cls] += 1
            if self.prio_on:
                self.task_prio.append(prio)
            if self.deadline_on:
                self.task_deadline.append(deadline)
        tid = self.submitted
        self.submitted = tid + 1
        self.submit_t.append(t)
        self.start_t.append(t)
        self.task_pool.append(p.idx)
        self.task_tenant.append(ten)
        self.deliveries.append(0)
        self.outcome.append(0)
        if self._typed or self._keyed:
            kinds, n_keys, hrng = self._stream_hints[i]
            if self._typed:
                k = 0
                if kinds is not None:
                    idx, cum = kinds
                    k = idx[bisect.bisect_right(cum, hrng.random() * cum[-1])]
                self.task_kinds.append(k)
            if self._keyed:
                self.task_keys.append(hrng.randrange(n_keys) if n_keys else -1)
        p.arr_bucket += 1
        p.queue.append(tid)
        if p.gate is not None and p.gate.bh is not None:
            p.gate.queued(tid)
        if p.free_hosts:
            self._dispatch(p, t)
        self._next_arrival(i, stream, t)

    def _next_arrival(self, i: int, stream: Any, t: float) -> None:
        nt = stream.next_after(t)
        if nt is not None and nt <= self._duration and self.offered < self._max_tasks:
            heapq.heappush(self._arrivals, (nt, i))
        else:
            self._open_streams -= 1
            if self._open_streams == 0 or self.offered >= self._max_tasks:
                self._open_streams = 0
                self._arrivals_over(t)

    # -- dispatch ----------------------------------------------------------------------
    def _dispatch(self, p: PoolRun, now: float) -> None:
        """Move queued tasks to agents with room, a batch per dispatcher call.

        Each call goes to the host the pool's host router picks among the hosts with a
        free routable slot (Serve's choice live); the batch size is the live
        dispatcher's (``batch_size`` of queue depth and the host's free slots); each
        task of a batch goes to the agent the host's ``HostCore`` places it on (its
        router, with the task's type and affinity key for task-aware routers, among the
        agents its breakers let through), and starts at once if the agent has a free
        slot, else waits in the agent's local queue.
        """
        if p.partitioned:
            return
        q, free_hosts = p.queue, p.free_hosts
        choose_host, rng_hosts = p.host_router.choose, p.rng_hosts
        hint = self._hint if p.hinted else None
        spec, item_bytes = self.batch_spec, p.payload_bytes
        conc, sample, extra = p.concurrency, p.sample, p.overhead
        heap, seq = self._heap, self._seq
        deliveries, start_t = self.deliveries, self.start_t
        timeout = self.task_timeout_s
        push = heapq.heappush
        deadlines = self.task_deadline if self.deadline_on else None
        # Bulkheads (fleet.sim.overload.PoolGate): the pool's in-flight cap, and tenants
        # held back at their in-flight limit.
        bh = p.gate.bh if p.gate is not None and p.gate.bh_in_flight else None
        while q and free_hosts:
            if len(free_hosts) == 1:
                h = free_hosts[0]
            else:
                j = choose_host(free_hosts, rng_hosts)
                if j is None:
                    return
                h = free_hosts[j]
            core = h.core
            place, agents = core.place, core.agents
            # (One queued task with room for it: batch_size's answer is 1, without
            # the call; the common case when arrivals find agents idle.)
            n = (
                1
                if len(q) == 1
                else batch_size(spec, len(q), core.slots.free_slots, item_bytes)
            )
            if bh is not None:
                n = min(n, p.gate.room(p))
            if n <= 0:
                return
            p.calls += 1
            sent = 0
            while sent < n and q:
                if deadlines is not None and deadlines[q[0]] <= now:
                    # Past its deadline: the queue drops it (as live, at lease).
                    self.overload.drop(p, q.popleft(), now)
                    continue
                if bh is not None and p.gate.park(q):
                    continue  # its tenant has its in-flight limit leased: held back
                i = place(hint(p, q[0]) if hint is not None else None)
                if i is None:
                    break
                tid = q.popleft()
                if bh is not None:
                    p.gate.leased_one(tid)
                sent += 1
                # The agent now holds the task (place took the slot), running or in its
                # local queue.
                a = agents[i]
                running = a.running
                if len(running) < conc:
                    dur = sample() * a.factor + extra
                    d = deliveries[tid]
                    if d < MAX_DELIVERIES_STORED:
                        deliveries[tid] = d + 1
                        if d == 0:
                            h.firsts += 1
                    start_t[tid] = now
                    running.append(tid)
                    if dur > timeout:
                        push(heap, (now + timeout, next(seq), EV_TIMEOUT, a, a.gen, tid))
                    else:
                        push(heap, (now + dur, next(seq), EV_DONE, a, a.gen, tid))
                else:
                    a.local.append(tid)
                    p.local_n += 1
            p.held += sent
            h.n += sent
            p.call_items += sent
            self._sync(h)
            if sent == 0:
                break  # the host's router would not place the task now (see place)

    def _on_recheck(self, h: SimHost, now: float) -> None:
        if now >= h.recheck_at:
            h.recheck_at = math.inf
            h.core.refresh()  # the breakers past their open time are half-open now
            self._sync(h)
            if h.pool.queue:
                self._dispatch(h.pool, now)

    def _hint(self, p: PoolRun, tid: int) -> RoutingHint:
        """What a task-aware router may know of task ``tid``: its type (the pool's
        capability when untyped, as live) and its affinity key."""
        keys = self.task_keys
        k = keys[tid] if keys else -1
        return RoutingHint(self._kind(p, tid), f"key-{k}" if k >= 0 else None)

    # -- completions -------------------------------------------------------------------
    def _start_local(self, p: PoolRun, a: SimAgent, t: float) -> None:
        """Start the next task waiting in an agent's local queue."""
        tid = a.local.popleft()
        p.local_n -= 1
        dur = p.sample() * a.factor
        d = self.deliveries[tid]
        if d < MAX_DELIVERIES_STORED:
            self.deliveries[tid] = d + 1
            if d == 0:
                a.host.firsts += 1
        self.start_t[tid] = t
        a.running.append(tid)
        kind = EV_DONE
        if dur > self.task_timeout_s:
            dur, kind = self.task_timeout_s, EV_TIMEOUT
        heapq.heappush(self._heap, (t + dur, next(self._seq), kind, a, a.gen, tid))

    def _on_done(self, a: SimAgent, gen: int, tid: int, t: float, code: int) -> None:
        if a.gen != gen:
            # The agent died meanwhile (the task went back to the queue then), or this
            # run was preempted (``preempt`` marked its event with generation -1).
            return
        p = a.pool
        running = a.running
        if len(running) == 1:
            running.clear()
        else:
            running.remove(tid)
        start = self.start_t[tid]
        svc = t - start
        p.busy_s += svc
        if code == OK and a.fail_p and p.rng_fail.random() < a.fail_p:
            code = ERROR
        ok = code == OK
        if p.gate is not None and p.gate.bh_in_flight:
            p.gate.unleased(tid, p.queue)
        # The host core learns from it (latency EWMA, breaker, router) and frees the slot.
        h = a.host
        h.core.done(a.index, ok, svc, self._kind(p, tid) if p.hinted else None)
        h.n -= 1
        self._sync(h)
        if not ok:
            code = self._after_failure(p, h, tid, code, t)
        if p.tokens:
            i_t, o_t = p.in_tok(), p.out_tok()
            p.input_tokens += i_t
            p.output_tokens += o_t
            p.token_usd += i_t * p.in_price + o_t * p.out_price
        outcome = self.outcome
        if not code:
            pass  # to be retried: no outcome yet
        elif p.partitioned:
            p.partition_buffer.append((tid, code))
        elif outcome[tid]:
            self.recorded_twice += 1
        else:
            # self._record(tid, code, t), inlined: this runs once per task
            outcome[tid] = code
            self.recorded += 1
            p.done_bucket += 1
            ten = self.task_tenant[tid]
            if code == OK:
                p.completed += 1
                self.ten_ok[ten] += 1
            else:
                p.failed += 1
            sub = self.submit_t[tid]
            if sub >= self.warmup_s:
                lat = t - sub
                p.lat.append(lat)
                p.waits.append(start - sub)
                self.ten_n[ten] += 1
                self.ten_lat[ten] += lat
            if self.overload is not None:
                self.overload.outcome(p, tid, code == OK, t)
            if self.arrivals_done and self.recorded == self.submitted:
                self.finished = True
        if self._outcome_hooks:
            for c in self._outcome_hooks:
                c.on_outcome(self, a, tid, ok, svc, t)
        p.held -= 1
        if a.local:
            self._start_local(p, a, t)
        st = a.state
        if st == ACTIVE:
            if p.queue:
                self._dispatch(p, t)
        elif st == DRAINING and a.in_flight == 0:
            self._stop(a, t)

    def _kind(self, p: PoolRun, tid: int) -> str:
        kinds = self.task_kinds
        return (self.kinds[kinds[tid]] if kinds else None) or p.capability

    def _after_failure(self, p: PoolRun, h: SimHost, tid: int, code: int, t: float) -> int:
        """A failed execution on host ``h``: 0 when its core retries it (back to the
        queue after its backoff), else the outcome code to record (the core's verdict
        when retries ran out). First attempts reach the retry budget before each
        decision, so its window sees them at most one event late."""
        core = h.core
        if h.firsts:
            core.first_attempts(h.firsts)
            h.firsts = 0
        reason = "timeout" if code == TIMEOUT else "error"
        # A task with a deadline: the core retries only what can start before it.
        left = self.task_deadline[tid] - t if self.deadline_on else math.inf
        r = core.decide_retry(
            max(1, self.deliveries[tid]),
            reason,
            p.error_text,
            None if math.isinf(left) else left,
        )
        if r.delay_s is not None:
            self.requeue_after(p, tid, t + r.delay_s)
            return 0
        return VERDICT_CODES.get(r.reason or "", code)

    def _record(self, tid: int, code: int, t: float) -> None:
        """Record a task's outcome, once: a second outcome for an id is counted, not kept."""
        outcome = self.outcome
        if outcome[tid]:
            self.recorded_twice += 1
            return
        outcome[tid] = code
        self.recorded += 1
        p = self.pools[self.task_pool[tid]]
        p.done_bucket += 1
        ten = self.task_tenant[tid]
        if code == OK:
            p.completed += 1
            self.ten_ok[ten] += 1
        else:
            p.failed += 1
        sub = self.submit_t[tid]
        if sub >= self.warmup_s:
            lat = t - sub
            p.lat.append(lat)
            p.waits.append(self.start_t[tid] - sub)
            self.ten_n[ten] += 1
            self.ten_lat[ten] += lat
        if self.overload is not None:
            self.overload.outcome(p, tid, code == OK, t)
        if self.arrivals_done and self.recorded == self.submitted:
            self.finished = True

    # -- agent life cycle --------------------------------------------------------------
    def _account(self, p: PoolRun, now: float) -> None:
        """Integrate agent-seconds up to ``now``; call before any change of counts."""
        dt = now - p.acct_t
        if dt > 0:
            alive = len(p.active) + p.n_draining
            p.alive_s += alive * dt
            p.paid_s += (alive + len(p.starting)) * dt
            p.acct_t = now

    def _ready(self, a: SimAgent, t: float) -> None:
        p = a.pool
        self._account(p, t)
        _list_remove(p.starting, a)
        a.state = ACTIVE
        _list_add(p.active, a)
        a.host.core.admit(a.index)
        self._sync(a.host)
        for c in self._up_hooks:
            c.on_agent_up(self, a, t)
        self.alive_total += 1
        if self.alive_total > self.agents_max:
            self.agents_max = self.alive_total
        if p.alive > p.alive_max:
            p.alive_max = p.alive
        if a.killed_at >= 0:
            rep = t - a.killed_at
            p.replacements.append(rep)
            if a.injection >= 0:
                inj = self.injections[a.injection]
                inj["replaced"] += 1
                inj["replaced_max_s"] = max(inj["replaced_max_s"], rep)
            a.killed_at, a.injection = -1.0, -1
        if p.queue:
            self._dispatch(p, t)

    def _begin_start(self, a: SimAgent, t: float) -> None:
        p = a.pool
        a.state = STARTING
        _list_add(p.starting, a)
        self._push(t + p.startup(), EV_READY, a, a.gen)

    def _restart_due(self, a: SimAgent, t: float) -> None:
        for c in self._gate_hooks:
            wait = c.restart_gate_s(self, a, t)
            if a.state != DEAD:
                return  # retired
            if wait is not None:
                self._push(t + wait, EV_RESTART, a, a.gen)
                return
        self._restart(a, t)

    def retire(self, a: SimAgent, now: float) -> bool:
        """Give up on a dead agent: it leaves the pool for good, and the autoscaler's
        next decision starts a fresh one in its place."""
        if a.state != DEAD:
            return False
        p = a.pool
        self._account(p, now)
        _list_remove(p.dead, a)
        a.state, a.gen = STOPPED, a.gen + 1
        self._gone(a)
        if a.injection >= 0:
            self.injections[a.injection]["not_replaced"] += 1
        self.log_event("retire", pool=p.name, agent=a.id)
        return True

    def _restart(self, a: SimAgent, t: float) -> None:
        p = a.pool
        self._account(p, t)
        _list_remove(p.dead, a)
        a.factor = a.base_factor  # a fresh process: chaos slowdowns do not survive it
        p.restarts += 1
        self.log_event("restart", pool=p.name, agent=a.id)
        self._begin_start(a, t)

    def _stop(self, a: SimAgent, t: float) -> None:
        """A draining agent with nothing left leaves the pool."""
        p = a.pool
        self._account(p, t)
        p.n_draining -= 1
        self.alive_total -= 1
        self._stopped(a, t)

    def _stopped(self, a: SimAgent, t: float) -> None:
        """Agent ``a`` leaves the pool on purpose (scaled down)."""
        a.state = STOPPED
        self._gone(a)
        for c in self._gone_hooks:
            c.on_agent_gone(self, a, t)

    def _handback(self, p: PoolRun, tids: list[int], now: float) -> None:
        """Put tasks an agent held back at the head of the queue, oldest first."""
        if not tids:
            return
        tids.sort()
        if p.gate is not None and p.gate.bh_in_flight:
            for tid in tids:
                p.gate.unleased(tid, p.queue)
        limit = self.max_deliveries
        for tid in reversed(tids):
            if self.deliveries[tid] >= limit:
                self._record(tid, MAX_DELIVERIES, now)
            else:
                p.queue.appendleft(tid)
                p.requeued += 1

    def _leave_service(self, p: PoolRun, a: SimAgent) -> None:
        """Take an agent out of its host core's routing for good (its breaker leaves
        too)."""
        a.host.core.hold(a.index, gone=True)
        self._sync(a.host)

    def kill(self, a: SimAgent, now: float, reason: str = "kill", injection: int = -1) -> bool:
        """Kill an agent: what it ran or held goes back to the queue; it restarts later
        (after the pool's ``restart_delay_s``, or what a component decides) unless it
        was draining anyway. Returns False if it was not alive."""
        st = a.state
        if st not in (ACTIVE, DRAINING):
            return False
        p = a.pool
        self._account(p, now)
        self._leave_service(p, a)
        tids = list(a.running)
        for tid in a.running:
            p.busy_s += now - self.start_t[tid]
        a.running.clear()
        if a.local:
            tids.extend(a.local)
            p.local_n -= len(a.local)
            a.local.clear()
        p.held -= a.in_flight
        a.host.n -= a.in_flight
        self._sync(a.host)
        a.in_flight = 0
        a.gen += 1  # every pending event of this agent is now stale
        self.alive_total -= 1
        if st == DRAINING:
            p.n_draining -= 1
            a.state = STOPPED
            self._gone(a)
        else:
            _list_remove(p.active, a)
            a.state = DEAD
            _list_add(p.dead, a)
            a.killed_at, a.injection = now, injection
        if reason == "crash":
            p.crashes += 1
        else:
            p.kills += 1
        self._handback(p, tids, now)
        for c in self._down_hooks:
            c.on_agent_down(self, a, reason, now)
        if a.state == DEAD:
            delay = p.restart_delay_s
            for c in self._restart_hooks:
                d = c.restart_delay_s(self, a, delay, now)
                if d is not None:
                    delay = d
                    break
            self._push(now + delay, EV_RESTART, a, a.gen)
        if p.queue:
            self._dispatch(p, now)
        return True

    def preempt(self, a: SimAgent, tid: int, now: float) -> float:
        """Cancel agent ``a``'s run of task ``tid`` for an urgent task (compute
        preemption, ``fleet.sim.preemption``), as a live host cancels a preempted run:
        not an outcome (no verdict for the agent's breaker or router, no retry, no
        tokens), its delivery refunded, the task back at the head of its priority in the
        queue at once. The freed slot is dispatched now: the priority queue hands it to
        the urgent task. Returns the seconds the run had worked (lost: it restarts).

        The run's completion event is made stale where it lies in the heap (same time
        and sequence number, so the heap order holds; a generation of -1, which
        ``_on_done`` ignores): the agent's generation cannot change, as that would
        cancel its other runs too. O(events pending), once per preemption."""
        p = a.pool
        heap, gen = self._heap, a.gen
        for k, e in enumerate(heap):
            # (Its current run's: a run of it cut earlier on this agent lies there too.)
            if e[3] is a and e[5] == tid and e[4] == gen and e[2] <= EV_TIMEOUT:
                heap[k] = (e[0], e[1], e[2], a, -1, tid)
                break
        a.running.remove(tid)
        worked = now - self.start_t[tid]
        p.busy_s += worked  # busy all the same (live: the slot was in flight)
        if p.gate is not None and p.gate.bh_in_flight:
            p.gate.unleased(tid, p.queue)
        h = a.host
        h.core.release(a.index)  # the slot, without a verdict on the agent
        h.n -= 1
        p.held -= 1
        self._sync(h)
        d = self.deliveries[tid]
        if 0 < d < MAX_DELIVERIES_STORED:
            self.deliveries[tid] = d - 1  # refunded: the run does not count
        p.queue.appendleft(tid)
        if a.local:
            self._start_local(p, a, now)
        elif a.state == DRAINING and a.in_flight == 0:
            self._stop(a, now)
        self._dispatch(p, now)
        return worked

    def requeue_after(self, p: PoolRun, tid: int, t: float) -> None:
        """Give a task back to the end of the pool's queue at time ``t`` (a retry)."""
        p.retry_wait += 1
        self._push(t, EV_REQUEUE, p, tid)

    def eject(self, a: SimAgent, now: float) -> bool:
        """Take a serving agent out of routing (for components): it finishes what it
        runs and gets no new task until ``readmit``. Its breaker stays."""
        if a.state != ACTIVE or a.held:
            return False
        a.host.core.hold(a.index)
        self._sync(a.host)
        return True

    def readmit(self, a: SimAgent, now: float) -> bool:
        """Put an agent ``eject`` took out back into routing."""
        if a.state != ACTIVE or not a.held:
            return False
        p = a.pool
        a.host.core.admit(a.index)
        self._sync(a.host)
        if p.queue:
            self._dispatch(p, now)
        return True

    def _drain(self, a: SimAgent, now: float) -> None:
        p = a.pool
        self._leave_service(p, a)
        _list_remove(p.active, a)
        if a.local:
            tids = list(a.local)
            a.local.clear()
            p.local_n -= len(tids)
            a.in_flight -= len(tids)
            p.held -= len(tids)
            a.host.n -= len(tids)
            self._sync(a.host)
            self._handback(p, tids, now)
        if a.in_flight == 0:
            self.alive_total -= 1
            self._stopped(a, now)
        else:
            a.state = DRAINING
            p.n_draining += 1

    # -- autoscaling -------------------------------------------------------------------
    def _on_control(self, p: PoolRun, t: float) -> None:
        # Admission's load and the degrade rule first: refusals are demand for agents.
        depth, shed = len(p.queue), 0
        if self._gated:
            shed, depth = self.overload.tick(p, t)
        decision, p.scale_state = decide(
            p.scaling, ScalingInput(t, p.target, depth, p.held, shed), p.scale_state
        )
        p.c_t.append(t)
        p.c_target.append(decision.agents)
        p.c_raw.append(decision.raw_desired)
        p.c_reasons[decision.reason] = p.c_reasons.get(decision.reason, 0) + 1
        # Also when the target holds but an agent was retired: replace it.
        if (
            decision.agents != p.target
            or len(p.active) + len(p.starting) + len(p.dead) != decision.agents
        ):
            self._apply_target(p, decision.agents, t)
        self._push(t + p.scaling.control_interval_s, EV_CONTROL, p)

    def _apply_target(self, p: PoolRun, target: int, t: float) -> None:
        """Start or remove agents so that serving + starting + restarting == target.

        Removal takes what costs least first: agents waiting to restart, then starting
        ones, then ejected ones, then idle ones, and only then busy agents, which drain.
        """
        self._account(p, t)
        p.target = target
        delta = target - (len(p.active) + len(p.starting) + len(p.dead))
        if delta > 0:
            for _ in range(delta):
                self._begin_start(self._new_agent(p), t)
            return
        k = -delta
        while k and p.dead:
            a = p.dead[-1]
            _list_remove(p.dead, a)
            a.gen += 1
            self._stopped(a, t)
            if a.injection >= 0:
                self.injections[a.injection]["not_replaced"] += 1
            k -= 1
        while k and p.starting:
            a = p.starting[-1]
            _list_remove(p.starting, a)
            a.gen += 1
            self._stopped(a, t)
            k -= 1
        if k and p.n_ejected:
            # Agents the breakers hold out (active, not routable) first.
            for a in [a for a in p.active if a.ridx < 0][:k]:
                self._drain(a, t)
                k -= 1
        if k:
            # Idle agents first: scan the agents with room from the newest end.
            idle: list[SimAgent] = []
            for h in reversed(p.free_hosts):
                for a in reversed(h.core.slots.free):
                    if a.in_flight == 0:
                        idle.append(a)  # type: ignore[arg-type]
                        if len(idle) == k:
                            break
                if len(idle) == k:
                    break
            for a in idle:
                self._drain(a, t)
            k -= len(idle)
        while k and p.active:
            self._drain(p.active[-1], t)
            k -= 1
        if p.queue:
            self._dispatch(p, t)

    # -- crashes, sampling -------------------------------------------------------------
    def _on_crash(self, p: PoolRun, t: float) -> None:
        # Thinning: crashes arrive at rate x max_agents; one hits an agent only if the
        # index drawn is a live one, so the per-agent rate holds at any pool size.
        j = p.rng_crash.randrange(p.scaling.max_agents)
        if j < len(p.active):
            a = p.active[j]
            self.log_event("crash", pool=p.name, agent=a.id)
            self.kill(a, t, "crash")
        self._push(t + p.rng_crash.expovariate(p.crash_rate_per_s), EV_CRASH, p)

    def _on_sample(self, t: float) -> None:
        submit_t = self.submit_t
        for p in self.pools:
            p.s_t.append(t)
            p.s_target.append(p.target)
            p.s_serving.append(p.serving)
            p.s_alive.append(p.alive)
            p.s_starting.append(len(p.starting))
            p.s_dead.append(len(p.dead))
            p.s_queue.append(len(p.queue))
            p.s_oldest.append(t - submit_t[p.queue[0]] if p.queue else 0.0)
            p.s_busy.append(p.busy)
            p.s_arrivals.append(p.arr_bucket)
            p.s_done.append(p.done_bucket)
            p.arr_bucket = 0
            p.done_bucket = 0
        for p in self.pools:
            for h in p.hosts:  # first attempts reach the retry budget every sample
                if h.firsts:
                    h.core.first_attempts(h.firsts)
                    h.firsts = 0
        for c in self._tick_hooks:
            c.on_tick(self, t)
        if not self.finished:
            self._push(t + self.scenario.sample_interval_s, EV_SAMPLE)

    # -- partitions (driven by fleet.sim.chaos) -----------------------------------------
    def set_partition(self, p: PoolRun, on: bool, now: float) -> None:
        """Cut the pool off from the dispatcher, or heal the cut and deliver what was held."""
        p.partitioned = on
        if not on:
            buf, p.partition_buffer = p.partition_buffer, []
            for tid, code in buf:
                self._record(tid, code, now)
            self._dispatch(p, now)

    # -- results -----------------------------------------------------------------------
    def in_system(self) -> int:
        """Tasks still somewhere in the simulated fleet (queues, agents, partition
        buffers, retry backoff)."""
        n = 0
        for p in self.pools:
            n += len(p.queue) + p.held + len(p.partition_buffer) + p.retry_wait
            if p.gate is not None:
                n += p.gate.parked_now
        return n

    def report(self) -> dict[str, Any]:
        return build_report(self)


def default_policy_components(scenario: Scenario) -> list[Component]:
    """fleet's own policies that the engine runs as components: restart backoff and
    the cascade guard of the fleet spec's ``health`` section."""
    return [HealthRestarts(scenario.fleet.health)]


def simulate(
    scenario: Scenario,
    seed: int | None = None,
    components: Sequence[Component] = (),
    progress: Callable[[float, int], None] | None = None,
    default_components: bool = True,
) -> dict[str, Any]:
    """Run a scenario and return its report (see ``fleet.sim.report``)."""
    return Simulation(scenario, seed, components, progress, default_components).run().report()
