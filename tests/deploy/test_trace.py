"""`fleet autoscale-trace`: the report's arithmetic on a synthetic trace (no Ray), and a
small live run on the session cluster producing the JSON and the PNG."""

from __future__ import annotations

import argparse
import json

import pytest

from fleet.cli.main import main
from fleet.cli.trace import Phase, build_report, trace_spec

SUMMARY = {
    "completed": 10,
    "failed": 0,
    "duplicate_executions": 0,
    "latency_s": {"p50": 0.1, "p95": 0.2, "p99": 0.3},
}


def _args(**kw):
    base = {"agent_delay_s": 0.1, "agents_per_host": 10, "min_agents": 2, "max_agents": 40}
    return argparse.Namespace(**{**base, **kw})


def _sample(t, agents, raw, hosts=1, depth=0, stopping=0):
    return {
        "t_s": t,
        "agents": agents,
        "raw_desired": raw,
        "hosts": hosts,
        "hosts_stopping": stopping,
        "desired_hosts": hosts,
        "queue_depth": depth,
        "in_flight": 0,
        "arrival_rate_per_s": 0.0,
        "reason": "hold",
    }


def test_report_measures_scale_up_lag_and_scale_down_rate():
    spec = trace_spec(_args())  # 2..40 agents: up 19/s (within 2 s), down 9.5/s (within 4 s)
    phases = [Phase("base", 0, 5, 20), Phase("step", 5, 10, 200), Phase("stopped", 15, 20, 0)]
    samples = [
        _sample(4.0, 2, 2),
        _sample(5.5, 2, 12),
        _sample(6.0, 6, 40, depth=300),
        _sample(7.0, 25, 40, 3),
        _sample(8.0, 40, 40, 4),
        _sample(20.0, 40, 40, 4),
        _sample(22.0, 21, 2),
        _sample(24.0, 2, 2, 1),
    ]
    r = build_report(spec, phases, samples, [(0.0, 1)], ["a"] * 10, [], SUMMARY)
    up, down = r["scale_up"], r["scale_down"]
    assert up["target_agents"] == 40 and up["signal_s"] == 1.0 and up["reached_s"] == 3.0
    assert up["lag_s"] == 2.0
    assert up["bound_s"] == pytest.approx(0.25 + (40 - 2) / 19, abs=1e-3)
    assert up["hosts_reached"] == 4 and up["peak_agents"] == 40
    assert down["from_agents"] == 40 and down["started_s"] == 20.0
    assert down["back_to_min_s"] == 24.0 and down["mean_rate_agents_per_s"] == 9.5
    assert down["allowed_rate_agents_per_s"] == 9.5 and down["min_duration_s"] == 4.0
    assert r["within_bounds"] and r["agents"] == {"min": 2, "max": 40, "start": 2, "end": 2}
    assert r["queue_depth_max"] == 300 and r["lost"] == 0


def test_report_times_host_removal_until_no_host_is_still_draining():
    spec = trace_spec(_args())
    phases = [Phase("base", 0, 1, 1), Phase("step", 1, 2, 10), Phase("stopped", 3, 10, 0)]
    samples = [
        _sample(0.5, 2, 2),
        _sample(2.0, 30, 30, 3),
        _sample(5.0, 30, 2, 3),
        _sample(6.0, 10, 2, 2, stopping=1),
        _sample(7.0, 2, 2, 1, stopping=2),
        _sample(8.0, 2, 2, 1, stopping=1),
        _sample(9.0, 2, 2, 1),
    ]
    r = build_report(spec, phases, samples, [], ["a"], [], {**SUMMARY, "redelivered": 3})
    assert r["hosts"] == {"min": 1, "max": 3, "end": 1, "max_stopping": 2}
    assert r["hosts_removed"] == {
        "from_hosts": 3,
        "to_hosts": 1,
        "started_s": 5.0,
        "done_s": 9.0,
    }
    assert r["redelivered"] == 3


def test_report_flags_agents_out_of_bounds():
    spec = trace_spec(_args())
    phases = [Phase("base", 0, 1, 1), Phase("step", 1, 1, 10)]
    r = build_report(
        spec, phases, [_sample(0.5, 1, 1), _sample(1.5, 41, 41)], [], [], [], SUMMARY
    )
    assert r["within_bounds"] is False


def test_a_spike_shorter_than_the_rate_limit_is_reported_as_not_reached():
    spec = trace_spec(_args())
    phases = [Phase("base", 0, 1, 1), Phase("step", 1, 1, 10)]
    samples = [_sample(0.5, 2, 2), _sample(1.2, 6, 30), _sample(1.5, 10, 3), _sample(2, 8, 2)]
    up = build_report(spec, phases, samples, [], [], [], SUMMARY)["scale_up"]
    assert up["target_agents"] == 30 and up["peak_agents"] == 10
    assert up["reached_s"] is None and up["lag_s"] is None


def test_invalid_bounds_exit_2_naming_the_field(capsys):
    assert main(["autoscale-trace", "--min-agents", "50", "--max-agents", "40"]) == 2
    assert (
        "pools.0.autoscaling: min_agents (50) must be <= max_agents (40)"
        in capsys.readouterr().err
    )


@pytest.mark.ray
def test_autoscale_trace_json_and_plot(ray_cluster, tmp_path, capsys):
    png = tmp_path / "trace.png"
    rc = main(
        [
            "autoscale-trace",
            "--json",
            "--plot",
            str(png),
            "--base-rate",
            "10",
            "--base-s",
            "1",
            "--step-s",
            "3",
            "--drain-s",
            "20",
            "--max-agents",
            "20",
            "--agent-delay-s",
            "0.05",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["lost"] == 0
    assert report["completed"] + report["failed"] == report["submitted"] > 0
    assert [p["name"] for p in report["phases"]] == ["base", "step", "stopped"]
    assert report["phases"][1]["rate_per_s"] == 10 * report["phases"][0]["rate_per_s"]
    assert report["within_bounds"]
    assert report["agents"]["max"] > report["agents"]["min"] == 2
    assert report["agents"]["end"] == 2, "arrivals stopped: back to the minimum"
    assert "scale_up" in report and "scale_down" in report
    s = report["samples"]
    assert len(s) >= 10
    assert {
        "t_s",
        "agents",
        "hosts",
        "hosts_stopping",
        "queue_depth",
        "arrival_rate_per_s",
    } <= set(s[0])
    assert report["redelivered"] >= 0 and report["hosts"]["max"] >= 1
    assert max(x["queue_depth"] for x in s) > 0
    assert max(x["arrival_rate_per_s"] for x in s) > report["phases"][0]["rate_per_s"]
    assert [x["t_s"] for x in s] == sorted(x["t_s"] for x in s)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert report["plot"] == str(png)


def test_host_drain_timeout_reaches_serve_options():
    from fleet.runtime.deploy import HOST_DRAIN_CHECK_S, host_deployment_options

    spec = trace_spec(_args(host_drain_timeout_s=2.5))
    opts = host_deployment_options(spec, spec.pools[0])
    assert opts["graceful_shutdown_timeout_s"] == 2.5
    assert opts["graceful_shutdown_wait_loop_s"] == HOST_DRAIN_CHECK_S < 2.5
    default = trace_spec(_args())
    assert (
        host_deployment_options(default, default.pools[0])["graceful_shutdown_timeout_s"]
        == default.pools[0].host_drain_timeout_s
        == 30.0
    )
