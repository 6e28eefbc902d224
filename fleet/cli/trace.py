"""``fleet autoscale-trace``: a step in arrival rate, and how agents and hosts follow it.

Runs one pool of sleeping agents on a local Ray cluster (or ``--address``) through three
phases: a base arrival rate, then ``--step-factor`` (10x) that rate, then no arrivals
until the pool is back at its minimum. It records, from the controller's timeline, the
logical agents, hosts (Serve replicas running, and stopping: removed and draining),
queue depth and arrival rate at every control tick, and reports how fast the agents
reached the policy's target and came back down, against the rates the spec allows, when
the hosts were removed, and whether every task was recorded (lost, redelivered).
``--task-s MIN MAX`` makes tasks slow, so scale-down removes hosts with work in hand.
``--plot FILE.png`` draws the same trace.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.cli.common import EXIT_INCOMPLETE, EXIT_OK, add_cluster_args, draws_progress
from fleet.spec import FleetSpec, parse_spec

POOL = "work"
TICK_S = 0.1
PROGRESS_EVERY_S = 2.0
TIMEOUT_MARGIN_S = 120.0

# The built-in fleet: one pool whose agents each take AGENT_DELAY_S per task.
AGENT_DELAY_S = 0.1
MIN_AGENTS = 2
MAX_AGENTS = 40
AGENTS_PER_HOST = 10
TARGET_QUEUED_PER_AGENT = 5
CONTROL_INTERVAL_S = 0.25
UPSCALE_WITHIN_S = 2.0
DOWNSCALE_WITHIN_S = 4.0
DOWNSCALE_STABILIZATION_S = 1.0


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    duration_s: float
    rate_per_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


def trace_spec(args: argparse.Namespace) -> FleetSpec:
    return parse_spec(
        {
            "name": "trace",
            "namespace": "fleet-trace",
            "queues": {"shards": 1, "lease_s": 30, "storage": {"backend": "memory"}},
            "pools": [
                {
                    "name": POOL,
                    "capability": POOL,
                    "agent_class": "fleet.agents.testing:SleepAgent",
                    "agent_kwargs": {"delay_s": args.agent_delay_s},
                    "agents_per_host": args.agents_per_host,
                    "cpus_per_host": 0,
                    **(
                        {"host_drain_timeout_s": args.host_drain_timeout_s}
                        if getattr(args, "host_drain_timeout_s", None)
                        else {}
                    ),
                    "autoscaling": {
                        "min_agents": args.min_agents,
                        "max_agents": args.max_agents,
                        "target_queued_per_agent": TARGET_QUEUED_PER_AGENT,
                        "control_interval_s": CONTROL_INTERVAL_S,
                        "upscale_within_s": UPSCALE_WITHIN_S,
                        "downscale_within_s": DOWNSCALE_WITHIN_S,
                        "downscale_stabilization_s": DOWNSCALE_STABILIZATION_S,
                    },
                }
            ],
        },
        "<autoscale-trace>",
    )


def _due(phases: list[Phase], t: float) -> float:
    """Arrivals owed by time ``t``: the integral of the phases' rates."""
    return sum(p.rate_per_s * min(max(t - p.start_s, 0.0), p.duration_s) for p in phases)


def run_trace(
    spec: FleetSpec,
    phases: list[Phase],
    drain_s: float,
    show: bool = False,
    make_task: Callable[[int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Start the fleet, drive the phases, wait for scale-down, and build the report."""
    from fleet.runtime.client import FleetClient

    fc = FleetClient.start(spec)
    try:
        return drive_trace(fc, phases, drain_s, show=show, make_task=make_task)[0]
    finally:
        fc.shutdown()


def drive_trace(
    fc: Any,
    phases: list[Phase],
    drain_s: float,
    show: bool = False,
    make_task: Callable[[int], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Drive the phases' arrivals into a running fleet's first pool: (report, task ids).

    ``make_task(k)`` builds the k-th task (default: an empty task of the pool's
    capability). After arrivals stop, waits (up to ``drain_s`` each) for every outcome,
    then for the pool's minimum agents and for its hosts to settle: as many running as
    the controller wants, none still stopping. ``show`` draws ``\r`` progress on stderr:
    only for a terminal (``fleet.cli.common.draws_progress``).
    """
    spec = fc.spec
    pool = spec.pools[0]
    make = make_task or (lambda k: {"capability": pool.capability})
    ids: list[str] = []
    arrivals: list[tuple[float, int]] = []  # (t_s, tasks submitted at t)
    t0_unix = time.time()
    t0 = time.monotonic()
    load_end = max(p.end_s for p in phases)
    next_note = 0.0
    while (t := time.monotonic() - t0) < load_end:
        n = int(_due(phases, t)) - len(ids)
        if n > 0:
            k0 = len(ids)
            ids += fc.submit([make(k0 + k) for k in range(n)]).accepted
            arrivals.append((round(t, 3), n))
        if show and t >= next_note:
            print(
                f"\rload: {t:5.1f}/{load_end:.0f}s, {len(ids)} submitted",
                end="",
                file=sys.stderr,
                flush=True,
            )
            next_note = t + PROGRESS_EVERY_S
        time.sleep(TICK_S)
    stop_s = time.monotonic() - t0
    # Arrivals stopped: wait for every outcome, then for the pool's minimum.
    missing = fc.wait(ids, timeout_s=drain_s + TIMEOUT_MARGIN_S)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and not _settled(
        fc.status()["pools"][pool.name], pool.autoscaling.min_agents
    ):
        time.sleep(CONTROL_INTERVAL_S)
    end_s = time.monotonic() - t0
    if show:
        print(file=sys.stderr)
    summary = fc.summary(ids)
    timeline = [s for s in fc.timeline() if s["pool"] == pool.name]
    samples = [
        {
            "t_s": round(s["unix_s"] - t0_unix, 3),
            "agents": s["agents"],
            "raw_desired": s["raw_desired"],
            "hosts": s["hosts"],
            "hosts_stopping": s.get("hosts_stopping", 0),
            "desired_hosts": s["desired_hosts"],
            "queue_depth": s["queue_depth"],
            "in_flight": s["in_flight"],
            "arrival_rate_per_s": s["arrival_rate_per_s"],
            "reason": s["reason"],
        }
        for s in timeline
        if s["unix_s"] >= t0_unix
    ]
    all_phases = [*phases, Phase("stopped", stop_s, end_s - stop_s, 0.0)]
    return build_report(spec, all_phases, samples, arrivals, ids, missing, summary), ids


def _settled(st: dict[str, Any], min_agents: int) -> bool:
    """The pool is back at its minimum agents, on the hosts it wants, none stopping."""
    return (
        st.get("agents") == min_agents
        and st.get("hosts") == st.get("desired_hosts")
        and not st.get("hosts_stopping")
    )


def _first(samples: list[dict[str, Any]], pred: Any, after_s: float) -> dict[str, Any] | None:
    return next((s for s in samples if s["t_s"] >= after_s and pred(s)), None)


def build_report(
    spec: FleetSpec,
    phases: list[Phase],
    samples: list[dict[str, Any]],
    arrivals: list[tuple[float, int]],
    ids: list[str],
    missing: list[str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The trace as one JSON-able report: phases, samples and the scale-up/down figures.

    The allowed rates restate the policy's rule (fleet.policy.autoscaling): each
    direction may move (max - min) / within_s agents per second, plus at most one
    control interval's banked credit.
    """
    a = spec.pools[0].autoscaling
    span = max(a.max_agents - a.min_agents, 1)
    up_rate = math.inf if a.upscale_within_s == 0 else span / a.upscale_within_s
    down_rate = math.inf if a.downscale_within_s == 0 else span / a.downscale_within_s
    step = next(p for p in phases if p.name == "step")
    agents = [s["agents"] for s in samples]
    report: dict[str, Any] = {
        "pool": spec.pools[0].name,
        "autoscaling": a.model_dump(mode="json"),
        "agents_per_host": spec.pools[0].agents_per_host,
        "phases": [
            {
                "name": p.name,
                "start_s": round(p.start_s, 3),
                "end_s": round(p.end_s, 3),
                "rate_per_s": p.rate_per_s,
            }
            for p in phases
        ],
        "submitted": len(ids),
        "completed": summary["completed"],
        "failed": summary["failed"],
        "lost": len(missing),
        "duplicate_executions": summary["duplicate_executions"],
        "redelivered": summary.get("redelivered", 0),
        "latency_s": {k: round(v, 4) for k, v in summary["latency_s"].items()},
        "agents": {
            "min": min(agents, default=0),
            "max": max(agents, default=0),
            "start": agents[0] if agents else 0,
            "end": agents[-1] if agents else 0,
        },
        "hosts": {
            "min": min((s["hosts"] for s in samples), default=0),
            "max": max((s["hosts"] for s in samples), default=0),
            "end": samples[-1]["hosts"] if samples else 0,
            "max_stopping": max((s.get("hosts_stopping", 0) for s in samples), default=0),
        },
        "queue_depth_max": max((s["queue_depth"] for s in samples), default=0),
        "within_bounds": all(a.min_agents <= n <= a.max_agents for n in agents),
        "arrivals": arrivals,
        "samples": samples,
    }
    # Scale-up: from the first tick whose signal (raw desired) asked for the step's peak,
    # to the first tick that ran that many agents.
    in_step = [s for s in samples if step.start_s <= s["t_s"] <= step.end_s + 1.0]
    target = max((s["raw_desired"] for s in in_step), default=a.min_agents)
    signal = _first(samples, lambda s: s["raw_desired"] >= target, step.start_s)
    reached = _first(samples, lambda s: s["agents"] >= target, step.start_s)
    if signal:
        # ``reached`` is None when the signal fell back before the rate limit let the
        # agents catch up with it (a short spike): that is the limit doing its job.
        before = max(
            (s["agents"] for s in samples if s["t_s"] < signal["t_s"]), default=a.min_agents
        )
        report["scale_up"] = {
            "target_agents": target,
            "peak_agents": max(agents, default=0),
            "signal_s": round(signal["t_s"] - step.start_s, 3),
            "reached_s": round(reached["t_s"] - step.start_s, 3) if reached else None,
            "lag_s": round(max(0.0, reached["t_s"] - signal["t_s"]), 3) if reached else None,
            "bound_s": round(a.control_interval_s + max(0, target - before) / up_rate, 3),
            "hosts_reached": max((s["hosts"] for s in samples), default=0),
        }
    # Scale-down: from the last tick at the peak after the step to the first at the min.
    peak = max(agents, default=0)
    last_peak = max((s["t_s"] for s in samples if s["agents"] == peak), default=0.0)
    at_min = _first(samples, lambda s: s["agents"] == a.min_agents, last_peak)
    if at_min and peak > a.min_agents:
        took = max(at_min["t_s"] - last_peak, 1e-9)
        report["scale_down"] = {
            "from_agents": peak,
            "started_s": round(last_peak, 3),
            "back_to_min_s": round(at_min["t_s"], 3),
            "mean_rate_agents_per_s": round((peak - a.min_agents) / took, 2),
            "allowed_rate_agents_per_s": round(down_rate, 2),
            "min_duration_s": round((peak - a.min_agents) / down_rate, 3),
        }
    # Hosts removed: from the last tick at the most hosts to the first one at the final
    # count with none still stopping (draining their batches).
    host_peak = report["hosts"]["max"]
    host_end = report["hosts"]["end"]
    if samples and host_end < host_peak:
        last_host_peak = max(s["t_s"] for s in samples if s["hosts"] == host_peak)
        gone = _first(
            samples,
            lambda s: s["hosts"] == host_end and not s.get("hosts_stopping"),
            last_host_peak,
        )
        report["hosts_removed"] = {
            "from_hosts": host_peak,
            "to_hosts": host_end,
            "started_s": round(last_host_peak, 3),
            "done_s": round(gone["t_s"], 3) if gone else None,
        }
    return report


def plot_trace(report: dict[str, Any], path: str) -> None:
    """Draw arrivals, queue, agents and hosts over time into a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = report["samples"]
    t = [x["t_s"] for x in s]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5))
    ax1.step(t, [x["arrival_rate_per_s"] for x in s], where="post", label="measured")
    phase_t = [p["start_s"] for p in report["phases"]] + [report["phases"][-1]["end_s"]]
    phase_r = [p["rate_per_s"] for p in report["phases"]] + [0.0]
    ax1.step(phase_t, phase_r, where="post", linestyle="--", label="offered")
    ax1.set_ylabel("arrivals / s")
    ax1.legend(loc="upper right")
    ax2.plot(t, [x["queue_depth"] for x in s], label="queued")
    ax2.plot(t, [x["in_flight"] for x in s], label="in flight")
    ax2.set_ylabel("tasks")
    ax2.legend(loc="upper right")
    ax3.step(t, [x["agents"] for x in s], where="post", label="agents")
    ax3.step(
        t,
        [x["raw_desired"] for x in s],
        where="post",
        linestyle=":",
        label="desired (before rate limits)",
    )
    ax3.set_ylabel("logical agents")
    ax3.set_xlabel("time since start (s)")
    hosts = ax3.twinx()
    hosts.step(t, [x["hosts"] for x in s], where="post", color="tab:red", label="hosts")
    hosts.step(
        t,
        [x.get("hosts_stopping", 0) for x in s],
        where="post",
        color="tab:red",
        linestyle="--",
        label="hosts stopping (draining)",
    )
    hosts.set_ylabel("hosts (Serve replicas)")
    hosts.set_ylim(bottom=0)
    hosts.yaxis.set_major_locator(MaxNLocator(integer=True))
    lines = ax3.get_legend_handles_labels()
    more = hosts.get_legend_handles_labels()
    ax3.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    for ax in (ax1, ax2, ax3):
        for p in report["phases"]:
            if p["name"] == "step":
                ax.axvspan(p["start_s"], p["end_s"], color="0.9", zorder=0)
    a = report["autoscaling"]
    fig.suptitle(
        f"fleet autoscale-trace: {a['min_agents']}-{a['max_agents']} agents, "
        f"{report['agents_per_host']} per host, 10x step (shaded)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _human(r: dict[str, Any]) -> str:
    lines = [
        f"submitted {r['submitted']}, completed {r['completed']}, failed {r['failed']}, "
        f"lost {r['lost']}, redelivered {r['redelivered']}",
        f"agents {r['agents']['min']}..{r['agents']['max']}, hosts "
        f"{r['hosts']['min']}..{r['hosts']['max']}, max queue {r['queue_depth_max']}",
    ]
    if "scale_up" in r:
        u = r["scale_up"]
        lines.append(
            f"up: {u['target_agents']} agents asked for, {u['peak_agents']} run, "
            f"{u['lag_s']}s after the signal (bound {u['bound_s']}s)"
        )
    if "scale_down" in r:
        d = r["scale_down"]
        lines.append(
            f"down: {d['from_agents']} -> min at {d['mean_rate_agents_per_s']}/s "
            f"(allowed {d['allowed_rate_agents_per_s']}/s)"
        )
    if "hosts_removed" in r:
        h = r["hosts_removed"]
        lines.append(
            f"hosts: {h['from_hosts']} -> {h['to_hosts']}, from {h['started_s']}s "
            f"until {h['done_s']}s"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fleet.runtime.client import init_ray

    spec = trace_spec(args)  # SpecError (bounds that contradict): a ValueError, exit 2
    base = args.base_rate
    phases = [
        Phase("base", 0.0, args.base_s, base),
        Phase("step", args.base_s, args.step_s, base * args.step_factor),
    ]
    make_task: Callable[[int], dict[str, Any]] | None = None
    if args.task_s:
        lo, hi = sorted(args.task_s)
        rng = random.Random(args.seed)

        def sleepy_task(k: int) -> dict[str, Any]:
            return {"capability": POOL, "payload": {"k": k, "sleep_s": rng.uniform(lo, hi)}}

        make_task = sleepy_task
    started = init_ray(args.address)
    try:
        report = run_trace(
            spec,
            phases,
            args.drain_s,
            show=draws_progress(not args.json),
            make_task=make_task,
        )
    finally:
        if started:
            import ray

            ray.shutdown()
    if args.plot:
        plot_trace(report, args.plot)
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(_human(report))
    return EXIT_OK if report["lost"] == 0 else EXIT_INCOMPLETE


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "autoscale-trace",
        help="trace agents and hosts through a 10x load step",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_cluster_args(p, json_help="print the trace as one JSON object on stdout")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also draw it into a PNG")
    p.add_argument(
        "--base-rate",
        type=_positive(float),
        default=20.0,
        help="arrivals per second before the step (default 20)",
    )
    p.add_argument(
        "--step-factor",
        type=_positive(float),
        default=10.0,
        help="the step multiplies the arrival rate by this (default 10)",
    )
    p.add_argument(
        "--base-s",
        type=_positive(float),
        default=5.0,
        help="seconds at the base rate (default 5)",
    )
    p.add_argument(
        "--step-s",
        type=_positive(float),
        default=10.0,
        help="seconds at the stepped rate (default 10)",
    )
    p.add_argument(
        "--drain-s",
        type=_positive(float),
        default=30.0,
        help="after arrivals stop, wait this long at most for the minimum (default 30)",
    )
    p.add_argument(
        "--agent-delay-s",
        type=_positive(float),
        default=AGENT_DELAY_S,
        help=f"seconds each task takes an agent (default {AGENT_DELAY_S})",
    )
    p.add_argument(
        "--task-s",
        type=_positive(float),
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="each task sleeps a random time in [MIN, MAX] seconds "
        "(default: every task takes --agent-delay-s), so that scale-down removes "
        "agents and hosts with slow work in hand",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --task-s (default 0)")
    p.add_argument(
        "--host-drain-timeout-s",
        type=_positive(float),
        default=None,
        help="how long a removed host may finish its batches before the rest "
        "is handed back for redelivery (default: the pool spec's, 30)",
    )
    p.add_argument("--min-agents", type=int, default=MIN_AGENTS)
    p.add_argument("--max-agents", type=int, default=MAX_AGENTS)
    p.add_argument("--agents-per-host", type=_positive(int), default=AGENTS_PER_HOST)
    p.set_defaults(func=run)
