"""Overload benchmark: goodput under 1x, 2x and 5x load, admission control on and off.

Two fleets alike but for admission control (``pools[].admission.enabled``): one pool of
``AGENTS`` agents of ``SERVICE_S`` (50 ms) each, autoscaling pinned, a queue that serves
higher priorities first, the durable defaults (SQLite queues and ledger), and an HTTP
ingress each on Serve's proxy on 127.0.0.1, deployed one at a time (no level runs beside
the other fleet's idle actors). The fleet without admission control comes first: it
measures the pool's capacity (a backlog of ``CAPACITY_TASKS`` tasks drained, tasks per
second) and takes the levels; then the other takes them, in the same sitting. Each
level (1x, 2x, 5x of that capacity) offers that load for ``LEVEL_S`` seconds in batches
of ``BATCH``, half over HTTP (``POST /tasks``) and half through the Python API
(``FleetClient.submit``), each task in one of three priority classes (10% high, 30%
normal, 60% low) with a deadline ``DEADLINE_S`` after it is sent. Each level also runs
in the simulator (``simulate_level``), on the same spec and the measured capacity.

Per level and fleet: goodput (tasks completed within their deadline per second, over
the measured capacity), per class the share shed and the p50/p99 latency (send to
outcome) of accepted tasks that completed, the p99 time to answer a request or call
that was refused something, and ``lost``: accepted tasks without an outcome once the
level's work is done (deadline failures are outcomes, not losses).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

import httpx

from fleet.stats import percentile

NEEDS_RAY = True
SERVICE_S = 0.05
AGENTS = 100
AGENTS_PER_HOST = 50
BATCH = 100
LEVELS = (1, 2, 5)
LEVEL_S = 30.0
QUICK_LEVEL_S = 6.0
DEADLINE_S = 2.0
CAPACITY_TASKS = 20_000
QUICK_CAPACITY_TASKS = 5_000
SETTLE_TIMEOUT_S = 120.0
# (class, task priority, share of the tasks); the classes' shed shares are the spec's.
CLASSES = (("high", 8, 0.1), ("normal", 5, 0.3), ("low", 2, 0.6))
PRIORITY_CLASSES = [
    {"name": "high", "min_task_priority": 7, "shed_wait_share": 1.0},
    {"name": "normal", "min_task_priority": 4, "shed_wait_share": 0.7},
    {"name": "low", "min_task_priority": 0, "shed_wait_share": 0.5},
]
CLASS_OF = {prio: name for name, prio, _ in CLASSES}
# Task k of a batch is of class PATTERN[k % 10]: 1 high, 3 normal, 6 low in every 10.
PATTERN = [8] + [5] * 3 + [2] * 6


def _spec(directory: str, name: str, admission: bool) -> Any:
    from fleet.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "namespace": f"fleet-{name}",
            "queues": {
                "shards": 2,
                "discipline": "priority",
                "max_depth": 2_000_000,
                "storage": {"directory": os.path.join(directory, name)},
            },
            "ingress": {
                "auth": {"mode": "none"},
                "limits": {"tenant_requests_per_s": 1e6, "tenant_burst": 1_000_000},
            },
            "budgets": {"priority_classes": PRIORITY_CLASSES},
            "pools": [
                {
                    "name": "work",
                    "capability": "work",
                    "agent_class": "fleet.agents.testing:SleepAgent",
                    "agent_kwargs": {"delay_s": SERVICE_S},
                    "agents_per_host": AGENTS_PER_HOST,
                    "cpus_per_host": 0,
                    "autoscaling": {
                        "min_agents": AGENTS,
                        "max_agents": AGENTS,
                        "control_interval_s": 0.5,
                    },
                    "admission": {"enabled": admission},
                }
            ],
        }
    )


class _Sent:
    """What one level sent and what came back, from both senders."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, tuple[str, float, float]] = {}  # id -> (class, sent, deadline)
        self.accepted: list[str] = []
        self.refused: dict[str, int] = defaultdict(int)  # class -> tasks refused
        self.offered: dict[str, int] = defaultdict(int)
        self.refusal_answer_s: list[float] = []  # requests/calls refused something
        self.full_refusal_answer_s: list[float] = []  # ... refused everything
        self.answer_s: dict[str, list[float]] = defaultdict(list)  # by path, all calls
        self.http_status: dict[int, int] = defaultdict(int)
        self.reasons: dict[str, int] = defaultdict(int)

    def batch(self, prefix: str, n: int) -> tuple[list[dict[str, Any]], float]:
        now = time.time()
        body = []
        for k in range(n):
            prio = PATTERN[k % len(PATTERN)]
            tid = f"{prefix}-{k}"
            body.append(
                {
                    "capability": "work",
                    "id": tid,
                    "priority": prio,
                    "deadline_unix_s": now + DEADLINE_S,
                }
            )
            with self.lock:
                self.tasks[tid] = (CLASS_OF[prio], now, now + DEADLINE_S)
                self.offered[CLASS_OF[prio]] += 1
        return body, now

    def answer(
        self,
        accepted: list[str],
        refused: list[tuple[str, str]],
        took_s: float,
        path: str,
    ) -> None:
        with self.lock:
            self.answer_s[path].append(took_s)
            self.accepted += accepted
            for tid, reason in refused:
                self.refused[self.tasks[tid][0]] += 1
                self.reasons[reason] += 1
            if refused:
                self.refusal_answer_s.append(took_s)
                if not accepted:
                    self.full_refusal_answer_s.append(took_s)


def _python_sender(fc: Any, sent: _Sent, tag: str, rate: float, stop_at: float) -> None:
    interval = BATCH / rate
    due = time.monotonic()
    n = 0
    while due < stop_at:
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        body, _ = sent.batch(f"{tag}-p{n}", BATCH)
        t0 = time.monotonic()
        report = fc.submit(body)
        took = time.monotonic() - t0
        sent.answer(
            report.accepted, [(r.id, r.reason) for r in report.refused], took, "python"
        )
        n += 1
        due += interval


async def _http_sender(url: str, sent: _Sent, tag: str, rate: float, stop_at: float) -> None:
    interval = BATCH / rate
    pending: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:

        async def post(n: int) -> None:
            body, _ = sent.batch(f"{tag}-h{n}", BATCH)
            t0 = time.monotonic()
            try:
                r = await c.post(f"{url}/tasks", json=body)
            except httpx.HTTPError:
                sent.answer([], [(t["id"], "http_error") for t in body], 0.0, "http")
                return
            took = time.monotonic() - t0
            with sent.lock:
                sent.http_status[r.status_code] += 1
            data = r.json()
            if r.status_code in (200, 202):
                sent.answer([t["id"] for t in body], [], took, "http")
            elif r.status_code in (429, 503) and "not_queued" in data:
                out = [(q["id"], q.get("reason") or "queue_full") for q in data["not_queued"]]
                sent.answer(data["accepted"], out, took, "http")
            else:
                out = [(t["id"], f"http_{r.status_code}") for t in body]
                sent.answer([], out, took, "http")

        due = time.monotonic()
        n = 0
        while due < stop_at:
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(post(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            due += interval
        if pending:
            await asyncio.gather(*pending)


def _level(fc: Any, url: str, tag: str, rate: float, seconds: float) -> dict[str, Any]:
    """Offer ``rate`` tasks/s for ``seconds``, wait for the accepted, and measure."""
    sent = _Sent()
    stop_at = time.monotonic() + seconds
    t0 = time.monotonic()
    py = threading.Thread(
        target=_python_sender, args=(fc, sent, tag, rate / 2, stop_at), daemon=True
    )
    py.start()
    asyncio.run(_http_sender(url, sent, tag, rate / 2, stop_at))
    py.join()
    span = time.monotonic() - t0
    missing = fc.wait(sent.accepted, timeout_s=SETTLE_TIMEOUT_S)
    outcomes = dict(zip(sent.accepted, fc.ledger.get(sent.accepted)))
    good = 0
    late = 0
    failed: dict[str, int] = defaultdict(int)
    lat: dict[str, list[float]] = defaultdict(list)
    for tid, o in outcomes.items():
        if o is None:
            continue
        cls, t_sent, deadline = sent.tasks[tid]
        if o.ok:
            lat[cls].append(o.finished_unix_s - t_sent)
            if o.finished_unix_s <= deadline:
                good += 1
            else:
                late += 1
        else:
            failed[o.reason or "?"] += 1
    offered = sum(sent.offered.values())
    return {
        "offered": offered,
        "offered_per_s": round(offered / span),
        "accepted": len(sent.accepted),
        "goodput_per_s": round(good / span, 1),
        "completed_late": late,
        "failed": dict(failed),
        "lost": len(missing),
        "refused_reasons": dict(sent.reasons),
        "http_status": {str(k): v for k, v in sorted(sent.http_status.items())},
        "rejection_p99_s": _pct(sent.refusal_answer_s, 0.99, 4),
        "rejection_p50_s": _pct(sent.refusal_answer_s, 0.5, 4),
        "full_rejection_p99_s": _pct(sent.full_refusal_answer_s, 0.99, 4),
        "full_rejections": len(sent.full_refusal_answer_s),
        "answer_p50_p99_s": {
            path: [_pct(v, 0.5, 4), _pct(v, 0.99, 4)] for path, v in sent.answer_s.items()
        },
        "classes": {
            name: {
                "offered": sent.offered[name],
                "shed_share": round(sent.refused[name] / sent.offered[name], 3)
                if sent.offered[name]
                else 0.0,
                "latency_p50_s": _pct(lat[name], 0.5, 3),
                "latency_p99_s": _pct(lat[name], 0.99, 3),
                "completed": len(lat[name]),
            }
            for name, _, _ in CLASSES
        },
    }


def _pct(values: list[float], q: float, digits: int) -> float | None:
    p = percentile(sorted(values), q)
    return None if p is None else round(p, digits)


def _decide_cost_us(n: int = 200_000) -> float:
    """Microseconds admission control adds per task at an entry point: ``decide`` on a
    loaded view (priority queue, arrivals at every level), what every submit pays."""
    from fleet.policy.admission import LEVELS, Admission, AdmissionRule, PoolLoad
    from fleet.spec.admission import AdmissionSpec
    from fleet.spec.budgets import BudgetsSpec

    rule = AdmissionRule.of(
        AdmissionSpec(enabled=True, max_queue_wait_s=86_400),
        BudgetsSpec(priority_classes=PRIORITY_CLASSES),
    )
    adm = Admission(time.time)
    adm.update(
        {
            "work": PoolLoad(
                rule, time.time(), (100,) * LEVELS, 1_000.0, (10.0,) * LEVELS, True, 100
            )
        }
    )
    t0 = time.perf_counter()
    for k in range(n):
        adm.decide("work", PATTERN[k % len(PATTERN)], None)
    return (time.perf_counter() - t0) / n * 1e6


def simulate_level(
    load: float, capacity_per_s: float, level_s: float, admission: bool, seed: int = 0
) -> dict[str, Any]:
    """The simulator's side of one level (``fleet.sim``, no Ray): the bench's own spec
    with a pool whose ``AGENTS`` agents each take ``AGENTS / capacity_per_s`` seconds a
    task (the measured capacity, transport included, as the service time), offered
    ``load`` x that capacity for ``level_s`` (Poisson arrivals), the classes' shares and
    the deadline as live. Returns goodput (completed by their deadline per second of
    the level, over the capacity) and per class the shed share and latency."""
    from fleet.sim import Scenario, simulate

    spec = _spec(tempfile.gettempdir(), "bench-sim", admission)
    shares = {prio: share for _, prio, share in CLASSES}
    scenario = Scenario.model_validate(
        {
            "name": f"overload-{load}x",
            "seed": seed,
            "fleet": spec,
            "pools": {
                "work": {"service": {"kind": "constant", "value_s": AGENTS / capacity_per_s}}
            },
            "workload": [
                {
                    "pool": "work",
                    "priorities": shares,
                    "deadline_s": DEADLINE_S,
                    "arrivals": {"kind": "poisson", "rate_per_s": load * capacity_per_s},
                }
            ],
            "duration_s": level_s,
            "drain_timeout_s": 4 * DEADLINE_S + 60,
        }
    )
    r = simulate(scenario)
    o = r["pools"]["work"]["overload"]
    good_per_s = o["goodput"] / level_s
    return {
        "goodput_per_s": round(good_per_s, 1),
        "goodput_share": round(good_per_s / capacity_per_s, 3),
        "lost": r["lost"],
        "classes": {
            name: {
                "offered": c["offered"],
                "shed_share": round(c["shed_share"], 3),
                "completed": c["completed"],
                "goodput": c["goodput"],
                "latency_p50_s": _round(c["latency_s"]["p50"]),
                "latency_p99_s": _round(c["latency_s"]["p99"]),
            }
            for name, c in o["classes"].items()
        },
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _capacity(fc: Any, n: int) -> float:
    """Tasks per second the pool completes from a backlog of ``n`` (no deadlines)."""
    items, _ = fc.validate([{"capability": "work", "id": f"cap-{k}"} for k in range(n)])
    t0 = time.monotonic()
    fc.submit_items(items)
    missing = fc.wait([it.id for it in items], timeout_s=SETTLE_TIMEOUT_S)
    if missing:
        raise RuntimeError(f"capacity run: {len(missing)} tasks without an outcome")
    return n / (time.monotonic() - t0)


def run(quick: bool = False) -> dict[str, Any]:
    from ray import serve

    from fleet.bench.ingress import stop_ingress_fleets
    from fleet.ingress import Ingress
    from fleet.runtime.client import FleetClient
    from fleet.runtime.deploy import start_serve

    level_s = QUICK_LEVEL_S if quick else LEVEL_S
    loadavg = os.getloadavg()
    directory = tempfile.mkdtemp(prefix="fleet-bench-overload-")
    specs = {
        "off": _spec(directory, "bench-noadmit", False),
        "on": _spec(directory, "bench-admit", True),
    }
    with socket.socket() as sock:  # a free loopback port for Serve's proxy
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start_serve(http_port=port, http=True)
    base = f"http://127.0.0.1:{port}"
    runs: dict[str, dict[int, dict[str, Any]]] = {"off": {}, "on": {}}
    capacity = 0.0
    # One fleet at a time (off first: it measures the capacity), so that no level runs
    # beside the other fleet's idle actors.
    for mode, spec in specs.items():
        fc = FleetClient.start(spec)
        try:
            serve.run(
                Ingress.bind(spec.name, spec.namespace),
                name=f"{spec.name}-ingress",
                route_prefix=f"/{mode}",
            )
            if mode == "off":
                capacity = _capacity(fc, QUICK_CAPACITY_TASKS if quick else CAPACITY_TASKS)
            else:
                _capacity(fc, 2_000)  # warm its hosts and its drain estimate
            for load in LEVELS:
                r = _level(fc, f"{base}/{mode}", f"{mode}{load}", load * capacity, level_s)
                r["goodput_share"] = round(r["goodput_per_s"] / capacity, 3)
                # The simulator on the same spec, size, load and measured capacity.
                r["simulated"] = simulate_level(load, capacity, level_s, mode == "on")
                runs[mode][load] = r
        finally:
            stop_ingress_fleets([fc], os.path.join(directory, spec.name))
    shutil.rmtree(directory, ignore_errors=True)
    levels: list[dict[str, Any]] = []
    for load in LEVELS:
        on, off = runs["on"][load], runs["off"][load]
        sim_share = on["simulated"]["goodput_share"]
        levels.append(
            {
                "load": load,
                "on": on,
                "off": off,
                # The acceptance's figures (admission on) at the top of the entry.
                "goodput_share": on["goodput_share"],
                "simulated_goodput_share": sim_share,
                # |simulated - live| / live: the acceptance's "within 10%".
                "sim_vs_live": round(
                    abs(sim_share - on["goodput_share"]) / on["goodput_share"], 3
                )
                if on["goodput_share"]
                else None,
                "rejection_p99_s": on["rejection_p99_s"],
                "lost": on["lost"] + off["lost"],
            }
        )
    return {
        "agents": AGENTS,
        "service_s": SERVICE_S,
        "batch": BATCH,
        "deadline_s": DEADLINE_S,
        "level_s": level_s,
        "capacity_per_s": round(capacity, 1),
        "levels": levels,
        "lost": sum(lv["lost"] for lv in levels),
        "loadavg_at_start": [round(x, 2) for x in loadavg],
        "median_goodput_share_on": statistics.median(lv["goodput_share"] for lv in levels),
        "decide_us_per_task": round(_decide_cost_us(), 2),
    }
