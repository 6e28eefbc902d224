"""Reports of a simulation run: figures, checks against the spec and targets, plots.

Everything in the report except ``wall_s`` and ``events_per_s`` is a function of the
scenario and the seed: floats are rounded to 6 decimals and keys sorted, so
``report_json(report, timing=False)`` is byte-identical across runs.

Definitions:
* ``lost`` = submitted tasks without a recorded outcome, counted from the per-task
  outcome table (not from a counter); ``in_system_at_end`` is how many of those were
  still queued or held when the run stopped (non-zero only if the drain timed out).
* ``utilization`` = busy agent-seconds / (alive agent-seconds x concurrency).
* ``fairness``: Jain's index J(x) = (sum x)^2 / (n sum x^2), 1 when all equal, 1/n at
  worst. Per pool, over its tenants' mean latency and completed share; across the
  fleet, over tenants (summed over the pools they use) of their completed share and
  their stretch (latency / mean service time of the work they sent), and over pools
  of their stretch.
* ``recovery_s`` of a chaos injection at t0: ``fleet.stats.recovery_s`` over the pool's
  sample buckets (completions, and arrivals as the offered load): the time from t0
  until throughput, averaged over ``RECOVERY_POST_WINDOW_S``, is back to
  ``RECOVERY_LEVEL`` of its mean over the ``RECOVERY_PRE_WINDOW_S`` before t0, or of
  the offered load when that is lower (a pool cannot complete more than arrives); the
  same definition as the live chaos harness's (``fleet.chaos``).
* latency percentiles are nearest rank (``fleet.stats.percentile``).
* ``autoscaler``: checked from the recorded decisions alone, against the spec: every
  target within [min, max]; every step and every window of steps within the rate
  limits (rate = (max - min) / within_s, bank of one interval's worth), per-interval
  caps and cooldowns; scale-down never below the highest desired value in the
  stabilization window; serving plus starting agents never above max_agents.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.sim.components import POLICY_SEAMS
from fleet.sim.outcomes import OK, REASONS
from fleet.sim.resilience import resilience_report
from fleet.sim.scenario import mean_duration_s
from fleet.stats import jain_index, percentile, recovery_s

if TYPE_CHECKING:
    from fleet.sim.engine import PoolRun, Simulation

MAX_SERIES_POINTS = 600
QUANTILES = [i / 100 for i in range(100)] + [0.995, 0.999, 1.0]
FLOAT_DECIMALS = 6
TIMING_KEYS = ("wall_s", "events_per_s")


# -- small statistics ------------------------------------------------------------------
def latency_summary(sorted_values: list[float]) -> dict[str, Any]:
    n = len(sorted_values)
    return {
        "n": n,
        "mean": sum(sorted_values) / n if n else None,
        "p50": percentile(sorted_values, 0.50),
        "p95": percentile(sorted_values, 0.95),
        "p99": percentile(sorted_values, 0.99),
        "max": sorted_values[-1] if n else None,
    }


def jain(values: list[float | None]) -> float | None:
    """``fleet.stats.jain_index`` of the values given (None entries are left out); None
    for fewer than two, where fairness says nothing."""
    xs = [v for v in values if v is not None]
    return jain_index(xs) if len(xs) >= 2 else None


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, FLOAT_DECIMALS) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def report_json(report: dict[str, Any], timing: bool = True, indent: int | None = None) -> str:
    """The report as JSON (sorted keys); ``timing=False`` drops the wall-clock figures,
    leaving text that is byte-identical for the same scenario and seed."""
    data = report if timing else {k: v for k, v in report.items() if k not in TIMING_KEYS}
    return json.dumps(data, sort_keys=True, indent=indent, allow_nan=False)


# -- autoscaler check ------------------------------------------------------------------
def check_autoscaler(p: PoolRun) -> dict[str, Any]:
    """Verify a pool's recorded autoscaler decisions against its spec (see module doc)."""
    spec = p.scaling
    times = [0.0, *p.c_t]
    targets = [spec.start_agents, *p.c_target]
    raws = [spec.start_agents, *p.c_raw]
    interval = spec.control_interval_s
    span = max(spec.max_agents - spec.min_agents, 1)
    problems: list[str] = []

    def rate(within: float) -> float:
        return math.inf if within == 0 else span / within

    up_rate, down_rate = rate(spec.upscale_within_s), rate(spec.downscale_within_s)
    # The policy banks at most one tick's worth of credit plus one agent
    # (fleet.policy.autoscaling._accrue), so no step and no window exceeds that.
    up_bank = math.inf if math.isinf(up_rate) else up_rate * interval + 1.0
    down_bank = math.inf if math.isinf(down_rate) else down_rate * interval + 1.0

    def step_cap(rate: float, dt: float) -> float:
        return math.inf if math.isinf(rate) else rate * max(dt, interval) + 1.0

    out_of_bounds = [
        (t, n) for t, n in zip(times, targets) if not spec.min_agents <= n <= spec.max_agents
    ]
    if out_of_bounds:
        problems.append(
            f"target {out_of_bounds[0][1]} at t={out_of_bounds[0][0]:.3f}s "
            f"outside [{spec.min_agents}, {spec.max_agents}]"
        )
    max_up = max_down = 0
    cum_up = cum_down = 0.0
    lo_up = lo_down = 0.0  # running min of (cum - rate * t), for the window check
    worst_up_window = worst_down_window = 0.0
    last_up = last_down = -math.inf
    for i in range(1, len(times)):
        t, prev, cur = times[i], targets[i - 1], targets[i]
        step = cur - prev
        if step > 0:
            max_up = max(max_up, step)
            bank = step_cap(up_rate, t - times[i - 1])
            cap = math.floor(bank) if not math.isinf(bank) else step
            if spec.upscale_max_agents_per_interval is not None:
                cap = min(cap, spec.upscale_max_agents_per_interval)
            if spec.upscale_max_fraction_per_interval is not None:
                cap = min(
                    cap, max(1, math.floor(prev * spec.upscale_max_fraction_per_interval))
                )
            if step > cap:
                problems.append(f"scale-up step {prev}->{cur} at t={t:.3f}s exceeds {cap}")
            if t - max(last_up, last_down) < spec.upscale_cooldown_s:
                problems.append(f"scale-up at t={t:.3f}s inside the upscale cooldown")
            last_up = t
            cum_up += step
        elif step < 0:
            max_down = max(max_down, -step)
            bank = step_cap(down_rate, t - times[i - 1])
            cap = math.floor(bank) if not math.isinf(bank) else -step
            if spec.downscale_max_agents_per_interval is not None:
                cap = min(cap, spec.downscale_max_agents_per_interval)
            if spec.downscale_max_fraction_per_interval is not None:
                cap = min(
                    cap, max(1, math.floor(prev * spec.downscale_max_fraction_per_interval))
                )
            if -step > cap:
                problems.append(f"scale-down step {prev}->{cur} at t={t:.3f}s exceeds {cap}")
            if t - max(last_up, last_down) < spec.downscale_cooldown_s:
                problems.append(f"scale-down at t={t:.3f}s inside the downscale cooldown")
            window_max = max(
                r
                for tt, r in zip(times[1 : i + 1], raws[1 : i + 1])
                if tt > t - spec.downscale_stabilization_s
            )
            if cur < window_max:
                problems.append(
                    f"scale-down to {cur} at t={t:.3f}s below the stabilized "
                    f"desired {window_max}"
                )
            last_down = t
            cum_down -= step
        if not math.isinf(up_rate):
            worst_up_window = max(worst_up_window, cum_up - up_rate * t - lo_up)
            lo_up = min(lo_up, cum_up - up_rate * t)
        if not math.isinf(down_rate):
            worst_down_window = max(worst_down_window, cum_down - down_rate * t - lo_down)
            lo_down = min(lo_down, cum_down - down_rate * t)
    if worst_up_window > up_bank + 1e-6:
        problems.append(
            f"scale-up outran its rate: {worst_up_window:.1f} agents above "
            f"{up_rate:.3f}/s over some window (bank {up_bank:.1f})"
        )
    if worst_down_window > down_bank + 1e-6:
        problems.append(
            f"scale-down outran its rate: {worst_down_window:.1f} agents above "
            f"{down_rate:.3f}/s over some window (bank {down_bank:.1f})"
        )
    provisioned = [s + st for s, st in zip(p.s_serving, p.s_starting)]
    over = [n for n in provisioned if n > spec.max_agents]
    if over:
        problems.append(
            f"{max(over)} agents serving or starting, above max_agents {spec.max_agents}"
        )
    return {
        "ok": not problems,
        "problems": problems[:20],
        "decisions": len(p.c_t),
        "reasons": dict(sorted(p.c_reasons.items())),
        "min_agents": spec.min_agents,
        "max_agents": spec.max_agents,
        "target_min": min(targets),
        "target_max": max(targets),
        "max_up_step": max_up,
        "max_down_step": max_down,
        "up_rate_per_s": up_rate,
        "down_rate_per_s": down_rate,
    }


# -- series ----------------------------------------------------------------------------
def _series(p: PoolRun, interval: float) -> dict[str, list]:
    n = len(p.s_t)
    k = max(1, math.ceil(n / MAX_SERIES_POINTS))
    out: dict[str, list] = {
        key: []
        for key in (
            "t_s",
            "target",
            "serving",
            "alive",
            "starting",
            "dead",
            "busy",
            "queue_depth",
            "oldest_age_s",
            "arrivals_per_s",
            "throughput_per_s",
        )
    }
    for i in range(0, n, k):
        j = min(n, i + k)
        span = p.s_t[j - 1] - (p.s_t[i - 1] if i > 0 else 0.0)
        out["t_s"].append(p.s_t[j - 1])
        out["target"].append(p.s_target[j - 1])
        out["serving"].append(max(p.s_serving[i:j]))
        out["alive"].append(max(p.s_alive[i:j]))
        out["starting"].append(max(p.s_starting[i:j]))
        out["dead"].append(max(p.s_dead[i:j]))
        out["busy"].append(max(p.s_busy[i:j]))
        out["queue_depth"].append(max(p.s_queue[i:j]))
        out["oldest_age_s"].append(max(p.s_oldest[i:j]))
        out["arrivals_per_s"].append(sum(p.s_arrivals[i:j]) / span if span > 0 else 0.0)
        out["throughput_per_s"].append(sum(p.s_done[i:j]) / span if span > 0 else 0.0)
    return out


# -- the report ------------------------------------------------------------------------
def build_report(sim: Simulation) -> dict[str, Any]:
    """Everything the run measured, checked against the spec and the scenario's targets."""
    sc = sim.scenario
    interval = sc.sample_interval_s
    outcome = bytes(sim.outcome)
    submitted = sim.submitted
    lost = outcome.count(0)
    failed_by_reason: dict[str, int] = {}

    for code, reason in REASONS.items():
        c = outcome.count(code)
        if c:
            failed_by_reason[reason] = c
    completed = outcome.count(OK)
    end = sim.end_t
    pool_sub = Counter(sim.task_pool)
    ten_sub = Counter(sim.task_tenant)

    pools: dict[str, Any] = {}
    # The arrivals' span: the scenario's duration, or the last arrival's time.
    arrivals_s = sc.duration_s if sc.duration_s is not None else max(sim.submit_t, default=0.0)
    all_lat: list[float] = []
    all_wait: list[float] = []
    stretches: list[float] = []
    total_cost = 0.0
    agent_cost = token_cost = 0.0
    busy = alive_slots = 0.0
    for p in sim.pools:
        lat = sorted(p.lat)
        wait = sorted(p.waits)
        all_lat.extend(lat)
        all_wait.extend(wait)
        lsum = latency_summary(lat)
        usd_agents = p.usd_per_agent_s * p.paid_s
        cost = usd_agents + p.token_usd
        agent_cost += usd_agents
        token_cost += p.token_usd
        total_cost += cost
        busy += p.busy_s
        alive_slots += p.alive_s * p.concurrency
        mean_svc = mean_duration_s(p.model.service)
        if lsum["mean"] is not None and mean_svc:
            stretches.append(lsum["mean"] / mean_svc)
        done = p.completed + p.failed
        injections = [i for i in sim.injections if i["pool"] == p.name]
        pools[p.name] = {
            "submitted": pool_sub[p.idx],
            "completed": p.completed,
            "failed": p.failed,
            "requeued": p.requeued,
            "latency_s": lsum,
            "latency_quantiles_s": [percentile(lat, q) for q in QUANTILES] if lat else [],
            "wait_s": latency_summary(wait),
            "mean_service_s": mean_svc,
            "throughput_per_s": {
                "mean": done / end if end > 0 else 0.0,
                "peak": max(p.s_done) / interval if p.s_done else 0.0,
            },
            "utilization": p.busy_s / (p.alive_s * p.concurrency) if p.alive_s > 0 else 0.0,
            "agents": {
                "max": p.alive_max,
                "min_serving": min(p.s_serving) if p.s_serving else 0,
                "mean_alive": p.alive_s / end if end > 0 else 0.0,
                "created": p.n_created,
            },
            "queue": {
                "max_depth": max(p.s_queue) if p.s_queue else 0,
                "max_oldest_age_s": max(p.s_oldest) if p.s_oldest else 0.0,
            },
            "dispatch": {
                "calls": p.calls,
                "mean_batch": p.call_items / p.calls if p.calls else 0.0,
            },
            "cost": {
                "usd": cost,
                "agents_usd": usd_agents,
                "tokens_usd": p.token_usd,
                "input_tokens": p.input_tokens,
                "output_tokens": p.output_tokens,
                "usd_per_task": cost / done if done else None,
            },
            "restarts": p.restarts,
            "kills": p.kills,
            "crashes": p.crashes,
            "replacement_s": {
                "n": len(p.replacements),
                "max": max(p.replacements) if p.replacements else None,
                "mean": sum(p.replacements) / len(p.replacements) if p.replacements else None,
            },
            "chaos_injections": len(injections),
            "autoscaler": check_autoscaler(p),
            **resilience_report(p),
        }
        if sim.overload is not None:
            pools[p.name]["overload"] = sim.overload.report(p, arrivals_s)
        if p.preemption is not None:
            pools[p.name].update(p.preemption.report())
    all_lat.sort()
    all_wait.sort()
    recorded = submitted - lost

    for inj in sim.injections:
        # Sample k closes the bucket [k * interval, (k + 1) * interval).
        run = sim.pool_by_name[inj["pool"]]
        inj["recovery_s"] = recovery_s(run.s_done, inj["t_s"], interval, run.s_arrivals)
    kills = [i for i in sim.injections if i["kind"] == "kill"]
    recoveries = [i["recovery_s"] for i in kills]
    max_recovery = (
        (None if any(r is None for r in recoveries) else max(recoveries))
        if recoveries
        else 0.0
    )

    tenants: dict[str, dict[str, Any]] = {}
    by_name: dict[str, list[float]] = {}  # name -> [submitted, completed, latency, work]
    for i, (name, pidx) in enumerate(sim.tenants):
        p = sim.pools[pidx]
        n = sim.ten_n[i]
        tenants.setdefault(p.name, {})[name] = {
            "submitted": ten_sub[i],
            "completed": sim.ten_ok[i],
            "mean_latency_s": sim.ten_lat[i] / n if n else None,
        }
        agg = by_name.setdefault(name, [0, 0, 0.0, 0.0])
        agg[0] += ten_sub[i]
        agg[1] += sim.ten_ok[i]
        agg[2] += sim.ten_lat[i]
        agg[3] += n * mean_duration_s(p.model.service)
    fairness: dict[str, Any] = {
        "tenants_completed_share": jain([a[1] / a[0] for a in by_name.values() if a[0]]),
        "tenants_stretch": jain([a[2] / a[3] for a in by_name.values() if a[3] > 0]),
        "pools_stretch": jain(stretches),
        "per_pool": {},
    }
    for pool_name, ts in tenants.items():
        if len(ts) > 1:
            fairness["per_pool"][pool_name] = {
                "tenants_latency": jain([t["mean_latency_s"] for t in ts.values()]),
                "tenants_completed_share": jain(
                    [t["completed"] / t["submitted"] for t in ts.values() if t["submitted"]]
                ),
            }

    autoscaler_ok = all(pools[p.name]["autoscaler"]["ok"] for p in sim.pools)
    latency = latency_summary(all_lat)
    usd_per_task = total_cost / recorded if recorded else None
    report: dict[str, Any] = {
        "scenario": sc.name,
        "seed": sim.seed,
        "tasks": submitted,
        "submitted": submitted,
        "completed": completed,
        "failed": submitted - lost - completed,
        "failed_by_reason": failed_by_reason,
        "lost": lost,
        "in_system_at_end": sim.in_system(),
        "recorded_twice": sim.recorded_twice,
        "drained": sim.finished,
        "sim_time_s": end,
        "events": sim.events,
        "wall_s": sim.wall_s,
        "events_per_s": sim.events / sim.wall_s if sim.wall_s > 0 else None,
        "agents_max": sim.agents_max,
        "latency_s": latency,
        "wait_s": latency_summary(all_wait),
        "throughput_per_s": {
            "mean": recorded / end if end > 0 else 0.0,
            "peak": max((sum(col) for col in zip(*(p.s_done for p in sim.pools))), default=0)
            / interval,
        },
        "utilization": busy / alive_slots if alive_slots > 0 else 0.0,
        "cost": {
            "usd": total_cost,
            "agents_usd": agent_cost,
            "tokens_usd": token_cost,
            "usd_per_task": usd_per_task,
            "usd_per_1000_tasks": usd_per_task * 1000 if usd_per_task is not None else None,
        },
        "fairness": fairness,
        "tenants": tenants,
        "pools": pools,
        "autoscaler": {"ok": autoscaler_ok},
        "chaos": {
            "injections": sim.injections,
            "kills": sum(i["agents"] for i in kills),
            "max_recovery_s": max_recovery,
        },
        "events_by_kind": dict(sorted(sim.event_counts.items())),
        "event_log": sim.event_log,
        "components": {c.name: c.report() for c in sim.components},
        "seams": dict(POLICY_SEAMS),
        "series": {p.name: _series(p, interval) for p in sim.pools},
    }
    report["targets"], report["targets_met"] = _targets(sc, report)
    return _clean(report)


def _target(target: float | None, value: float | None) -> dict[str, Any]:
    return {"target": target, "value": value, "met": value is not None and value <= target}


def _targets(sc: Any, r: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    t = sc.targets
    out: dict[str, Any] = {
        "lost": {"target": 0, "value": r["lost"], "met": r["lost"] == 0},
        "autoscaler": {"met": r["autoscaler"]["ok"]},
    }
    if t.p99_latency_s is not None:
        out["p99_latency_s"] = _target(t.p99_latency_s, r["latency_s"]["p99"])
    if t.recovery_s is not None:
        out["recovery_s"] = _target(t.recovery_s, r["chaos"]["max_recovery_s"])
    if t.max_usd_per_1000_tasks is not None:
        out["usd_per_1000_tasks"] = _target(
            t.max_usd_per_1000_tasks, r["cost"]["usd_per_1000_tasks"]
        )
    for name, pt in t.pools.items():
        if pt.p99_latency_s is not None:
            out[f"pools.{name}.p99_latency_s"] = _target(
                pt.p99_latency_s, r["pools"][name]["latency_s"]["p99"]
            )
        # Per class (a run with priorities, deadlines or admission: ``overload``); a
        # class that offered nothing has no value and misses its target.
        per_class = r["pools"][name].get("overload", {}).get("classes", {})
        for cls, ct in pt.classes.items():
            c = per_class.get(cls)
            key = f"pools.{name}.classes.{cls}"
            if ct.p99_latency_s is not None:
                out[f"{key}.p99_latency_s"] = _target(
                    ct.p99_latency_s, c["latency_s"]["p99"] if c else None
                )
            if ct.max_shed_share is not None:
                out[f"{key}.shed_share"] = _target(
                    ct.max_shed_share, c["shed_share"] if c else None
                )
    return out, all(v["met"] for v in out.values())


# -- plots -----------------------------------------------------------------------------
def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write PNG plots of a report into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = report["series"]
    names = list(series)
    kills = list(report["chaos"]["injections"])
    files = []

    def panels(title: str):
        fig, axes = plt.subplots(
            len(names), 1, figsize=(10, 2.8 * len(names)), sharex=True, squeeze=False
        )
        fig.suptitle(f"{report['scenario']}: {title}")
        return fig, [ax[0] for ax in axes]

    def mark(ax, pool: str) -> None:
        for inj in kills:
            if inj["pool"] == pool:
                ax.axvline(inj["t_s"], color="red", alpha=0.25, lw=0.8)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)

    fig, axes = panels("agents over time (red: chaos injections)")
    for ax, name in zip(axes, names):
        s = series[name]
        for key in ("target", "serving", "alive", "starting", "busy"):
            ax.plot(s["t_s"], s[key], label=key, lw=1)
        mark(ax, name)
        ax.set_ylabel(name)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("virtual time (s)")
    save(fig, "agents.png")

    fig, axes = panels("queue depth and oldest queued task")
    for ax, name in zip(axes, names):
        s = series[name]
        ax.plot(s["t_s"], s["queue_depth"], lw=1, label="depth")
        ax.set_ylabel(f"{name} depth")
        ax2 = ax.twinx()
        ax2.plot(s["t_s"], s["oldest_age_s"], lw=1, color="tab:orange", label="oldest age")
        ax2.set_ylabel("oldest age (s)")
        mark(ax, name)
    axes[-1].set_xlabel("virtual time (s)")
    save(fig, "queue.png")

    fig, axes = panels("arrivals and throughput (tasks/s)")
    for ax, name in zip(axes, names):
        s = series[name]
        ax.plot(s["t_s"], s["arrivals_per_s"], lw=1, label="arrivals")
        ax.plot(s["t_s"], s["throughput_per_s"], lw=1, label="throughput")
        mark(ax, name)
        ax.set_ylabel(name)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("virtual time (s)")
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, p in report["pools"].items():
        qs = p["latency_quantiles_s"]
        if qs:
            ax.plot(qs, QUANTILES[: len(qs)], label=name, lw=1.2)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of tasks")
    ax.set_title(f"{report['scenario']}: latency CDF (p99 {report['latency_s']['p99']} s)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "latency.png")
    return files
