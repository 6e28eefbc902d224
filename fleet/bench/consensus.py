"""Consensus benchmark: decision latency, messages and depth from 10 to 10,000 voters.

For each population size one reducer tree is built (its build time is reported, not
counted in the decision time) and several questions are decided in each mode. Voters
are simulated with a 60/40 bias and answer at once, so the figures measure fleet's
machinery, not a model's latency. ``agreement`` is the share of decisions equal to the
exact majority of the whole population, computed locally from the voters' opinions.
Target: 10,000 voters decide in under 1 s on 2 cores (``wall_s``, median, measured at
the driver around ``Electorate.decide``).

Run: ``python -m fleet.bench.consensus [--quick] [--json] [--plot latency.png]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ray

from fleet.consensus import ConsensusSpec, Electorate, Question, make_voters
from fleet.policy.consensus import Tally, Vote, evaluate
from fleet.stats import median

NEEDS_RAY = True
AGENTS = (10, 100, 1_000, 10_000)
MODES = ("hierarchical", "probabilistic")
BIAS = 0.6
SEED = 7
TIMEOUT_S = 10.0
TRIALS = 10
QUICK_TRIALS = 3
TARGET_S = 1.0


def exact_option(voters: list[Any], question: Question) -> str | None:
    """The exact rule over every voter's opinion: what a full count would decide."""
    tally = Tally.of(Vote(v.opinion(question)) for v in voters)
    verdict = evaluate(tally, ConsensusSpec(), question, population=len(voters), final=True)
    return verdict.option if verdict else None


def _bench_size(n: int, trials: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    voters = make_voters(n, bias=BIAS, seed=SEED)
    t0 = time.perf_counter()
    electorate = Electorate.start(voters, ConsensusSpec(timeout_s=TIMEOUT_S))
    build_s = time.perf_counter() - t0
    rows = []
    try:
        for mode in MODES:
            policy = ConsensusSpec(mode=mode, timeout_s=TIMEOUT_S, memo_ttl_s=0)
            electorate.decide(Question("warm-up", ("yes", "no")), policy)
            walls, inside, msgs, depths, asked, reasons, agree = (
                [],
                [],
                [],
                [],
                [],
                Counter(),
                0,
            )
            for t in range(trials):
                q = Question(f"bench question {t}", ("yes", "no"))
                t1 = time.perf_counter()
                d = electorate.decide(q, policy)
                walls.append(time.perf_counter() - t1)
                inside.append(d.elapsed_s)
                msgs.append(d.messages)
                depths.append(d.depth)
                asked.append(d.tally.eligible)
                reasons[d.reason.value] += 1
                agree += d.option == exact_option(voters, q)
            rows.append(
                {
                    "mode": mode,
                    "agents": n,
                    "wall_s": median(walls),
                    "wall_max_s": max(walls),
                    "decide_s": median(inside),
                    "messages": int(median(msgs)),
                    "depth": max(depths),
                    "agreement": agree / trials,
                    "asked": int(median(asked)),
                    "reasons": dict(reasons),
                    "trials": trials,
                }
            )
    finally:
        electorate.shutdown()
    return rows, {
        "agents": n,
        "reducers": electorate.plan.reducers,
        "actor_depth": electorate.plan.actor_depth,
        "build_s": build_s,
    }


def plot_latency(results: list[dict[str, Any]], path: str | Path) -> None:
    """Write a PNG of median decision latency against agent count, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        ax.plot(
            [r["agents"] for r in rows], [r["wall_s"] for r in rows], marker="o", label=mode
        )
    ax.axhline(TARGET_S, color="grey", linestyle="--", linewidth=1, label="target (1 s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("logical agents (voters)")
    ax.set_ylabel("decision latency, median (s)")
    ax.set_title("fleet consensus on a local Ray cluster (2 cores)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, plot: str | Path | None = None) -> dict[str, Any]:
    """Benchmark both modes at 10 to 10,000 agents; plot to ``plot`` (PNG) if given."""
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        trials = QUICK_TRIALS if quick else TRIALS
        results, trees = [], []
        for n in AGENTS:
            rows, tree = _bench_size(n, trials)
            results.extend(rows)
            trees.append(tree)
        biggest = [r["wall_s"] for r in results if r["agents"] == max(AGENTS)]
        out: dict[str, Any] = {
            "results": results,
            "trees": trees,
            "target_s": TARGET_S,
            "meets_target": all(w < TARGET_S for w in biggest),
            "bias": BIAS,
        }
        if plot is not None:
            plot_latency(results, plot)
            out["plot"] = str(plot)
        return out
    finally:
        if started:
            ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--plot", default=None, help="write a PNG of latency vs agents here")
    args = p.parse_args()
    # Ray's driver prints worker-startup warnings on stdout; keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        result = {"suite": "consensus", **run(quick=args.quick, plot=args.plot)}
    print(json.dumps(result, sort_keys=True) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
