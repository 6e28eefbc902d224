"""``fleet simulate`` and the simulator benchmark."""

from __future__ import annotations

import json

import yaml

from fleet.cli import simulate as cli
from fleet.cli.main import main

from .helpers import scenario_dict


def run_cli(argv: list[str]) -> int:
    return main(["simulate", *argv])


def small(tmp_path, **kw) -> str:
    data = scenario_dict(max_tasks=300, **kw)
    data["chaos"] = {"kills": [{"share": 0.5, "waves": 2, "start_s": 10, "end_s": 60}]}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_json_report_and_exit_zero(tmp_path, capsys):
    assert run_cli([small(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("wall_s", "events_per_s", "tasks", "agents_max", "lost"):
        assert key in r
    assert r["tasks"] == 300 and r["lost"] == 0 and r["targets_met"] is True


def test_no_timing_output_is_byte_identical_and_seed_overrides(tmp_path, capsys):
    spec = small(tmp_path)
    run_cli([spec, "--json", "--no-timing"])
    first = capsys.readouterr().out
    run_cli([spec, "--json", "--no-timing"])
    assert capsys.readouterr().out == first
    run_cli([spec, "--json", "--no-timing", "--seed", "99"])
    other = capsys.readouterr().out
    assert other != first and json.loads(other)["seed"] == 99


def test_missed_target_exits_one(tmp_path, capsys):
    assert run_cli([small(tmp_path, targets={"p99_latency_s": 0.001})]) == 1
    out = capsys.readouterr().out
    assert "p99_latency_s: MISSED" in out


def test_bad_scenario_exits_two_with_line_and_field(tmp_path, capsys):
    data = scenario_dict()
    data["pools"]["work"]["service"] = {"kind": "bimodal"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run_cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert "pools.work.service" in err and "bimodal" in err
    line = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if "service:" in text
    )
    assert f"bad.yaml:{line}:" in err


def test_plots_are_written(tmp_path, capsys):
    assert run_cli([small(tmp_path), "--plot", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["agents.png", "latency.png", "queue.png", "throughput.png"]
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_registered_in_the_fleet_cli():
    from fleet.cli.main import build_parser

    args = build_parser().parse_args(["simulate", "x.yaml", "--json", "--seed", "3"])
    assert args.func is cli.run and args.seed == 3


def test_quick_benchmark():
    from fleet.bench import sim as bench

    out = bench.run(quick=True)
    assert out["tasks"] == 50_000
    assert out["lost"] == 0
    assert out["agents_max"] <= 600
    assert out["report"]["autoscaler"]["ok"]
    for key in ("wall_s", "events_per_s", "p99_s"):
        assert out[key] > 0
