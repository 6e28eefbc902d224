"""Scenario loading: valid files load; bad input is rejected with its line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleet.sim import ScenarioError, load_scenario, parse_scenario
from fleet.sim.scenario import LognormalDuration, TraceArrivals

from .helpers import scenario_dict

SCENARIOS = Path(__file__).resolve().parents[2] / "examples" / "scenarios"

BASE = """\
name: bad
fleet:
  pools:
    - name: work
      capability: work
      agent_class: fleet.agents.examples:NoopAgent
pools:
  work:
    service: {SERVICE}
workload:
  - pool: {POOL}
    arrivals:
      kind: poisson
      rate_per_s: {RATE}
max_tasks: 100
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def bad(
    tmp_path: Path,
    service: str = "{kind: exponential, mean_s: 1}",
    pool: str = "work",
    rate: str = "5",
    extra: str = "",
) -> ScenarioError:
    text = BASE.replace("{SERVICE}", service).replace("{POOL}", pool).replace("{RATE}", rate)
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text + extra))
    return info.value


def test_shipped_scenarios_load():
    names = sorted(p.name for p in SCENARIOS.glob("*.yaml"))
    assert names == [
        "analytics-preemption.yaml",
        "black-friday.yaml",
        "flash-sale.yaml",
        "marketplace.yaml",
        "support-desk.yaml",
    ]
    for path in SCENARIOS.glob("*.yaml"):
        sc = load_scenario(path)
        assert sc.targets.p99_latency_s or sc.targets.pools, path
        assert sc.targets.recovery_s is not None, path
    bf = load_scenario(SCENARIOS / "black-friday.yaml")
    assert bf.max_tasks == 1_000_000
    assert max(p.autoscaling.max_agents for p in bf.fleet.pools) == 10_000
    assert sum(k.share for k in bf.chaos.kills) == pytest.approx(0.10)


def test_valid_scenario_parses_distributions(tmp_path):
    sc = load_scenario(
        write(
            tmp_path,
            BASE.replace("{SERVICE}", "{kind: lognormal, median_s: 2, sigma: 0.5}")
            .replace("{POOL}", "work")
            .replace("{RATE}", "3"),
        )
    )
    service = sc.pools["work"].service
    assert isinstance(service, LognormalDuration)
    assert service.mean_s == pytest.approx(2 * 2.718281828 ** (0.125), rel=1e-6)


def test_unknown_distribution_names_line_and_field(tmp_path):
    err = bad(tmp_path, service="{kind: zipf, mean_s: 1}")
    ((path, line, reason),) = err.errors
    assert path == "pools.work.service"
    assert line == 9
    assert "zipf" in reason and "lognormal" in reason
    assert ":9: pools.work.service" in str(err)


def test_negative_rate_names_line_and_field(tmp_path):
    err = bad(tmp_path, rate="-3")
    ((path, line, reason),) = err.errors
    assert path == "workload.0.arrivals.rate_per_s"
    assert line == 14
    assert "greater than or equal to 0" in reason


def test_bad_field_inside_a_distribution_drops_the_tag_from_the_path(tmp_path):
    err = bad(tmp_path, service="{kind: lognormal, median_s: 1, sigma: -1}")
    ((path, line, _),) = err.errors
    assert path == "pools.work.service.sigma"
    assert line == 9


def test_unknown_key_is_rejected_at_its_line(tmp_path):
    err = bad(tmp_path, extra="max_taks: 5\n")
    paths = {(p, line) for p, line, _ in err.errors}
    assert ("max_taks", 16) in paths
    assert any("unknown field" in r for _, _, r in err.errors)


def test_unknown_pool_in_workload(tmp_path):
    err = bad(tmp_path, pool="nope")
    ((path, line, reason),) = err.errors
    assert path == "workload.0.pool"
    assert line == 11
    assert "'nope' is not a pool of the fleet (work)" in reason


def test_fleet_spec_errors_carry_the_fleet_path(tmp_path):
    text = (
        BASE.replace("{SERVICE}", "{kind: constant, value_s: 1}")
        .replace("{POOL}", "work")
        .replace("{RATE}", "1")
        .replace(
            "      agent_class: fleet.agents.examples:NoopAgent\n",
            "      agent_class: fleet.agents.examples:NoopAgent\n"
            "      autoscaling: {min_agents: 5, max_agents: 2}\n",
        )
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    ((path, line, reason),) = info.value.errors
    assert path == "fleet.pools.0.autoscaling"
    assert line == 7
    assert "min_agents (5) must be <= max_agents (2)" in reason


def test_open_ended_poisson_needs_a_cap():
    data = scenario_dict()
    del data["max_tasks"]
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert info.value.errors[0][0] == "duration_s"


def test_token_model_needs_a_price():
    data = scenario_dict()
    data["pools"]["work"]["tokens"] = {
        "model": "gpt-x",
        "input_tokens": {"kind": "constant", "value": 1},
        "output_tokens": {"kind": "constant", "value": 1},
    }
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert info.value.errors[0][0] == "pools.work.tokens.model"
    assert "no price" in info.value.errors[0][2]


def test_burst_ramp_longer_than_half_the_burst_is_rejected():
    data = scenario_dict()
    data["workload"][0]["arrivals"]["bursts"] = [
        {"start_s": 1, "duration_s": 10, "multiplier": 2, "ramp_s": 6}
    ]
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert info.value.errors[0][0] == "workload.0.arrivals.bursts.0"


TRACE_SCENARIO = """\
name: traced
fleet:
  pools:
    - {name: work, capability: work, agent_class: "fleet.agents.examples:NoopAgent"}
pools:
  work:
    service: {kind: constant, value_s: 0.1}
workload:
  - pool: work
    arrivals: {kind: trace, path: trace.txt}
"""


def test_trace_file_is_read_relative_to_the_scenario(tmp_path):
    (tmp_path / "trace.txt").write_text(
        "# seconds\n0.5\n1.0\n\n1.0  # same time is fine\n2.5\n"
    )
    sc = load_scenario(write(tmp_path, TRACE_SCENARIO))
    arrivals = sc.workload[0].arrivals
    assert isinstance(arrivals, TraceArrivals)
    assert list(arrivals.times) == [0.5, 1.0, 1.0, 2.5]


def test_unordered_trace_names_the_trace_line(tmp_path):
    (tmp_path / "trace.txt").write_text("# seconds\n0.5\n3.0\n2.0\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, TRACE_SCENARIO))
    ((path, line, reason),) = info.value.errors
    assert path == "workload.0.arrivals"
    assert line == 10
    assert "line 4: timestamp 2 is earlier than the previous one (3, line 3)" in reason


def test_trace_with_garbage_names_the_line(tmp_path):
    (tmp_path / "trace.txt").write_text("1.0\nsoon\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, TRACE_SCENARIO))
    assert "line 2: 'soon' is not a number of seconds" in info.value.errors[0][2]


def test_missing_trace_file(tmp_path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, TRACE_SCENARIO))
    assert "trace.txt" in info.value.errors[0][2]


def test_fleet_file_reference_and_its_errors(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "pools:\n  - name: work\n    capability: work\n"
        "    agent_class: fleet.agents.examples:NoopAgent\n"
    )
    text = TRACE_SCENARIO.replace(
        "fleet:\n  pools:\n    - {name: work, capability: work, agent_class: "
        '"fleet.agents.examples:NoopAgent"}\n',
        "fleet_file: fleet.yaml\n",
    )
    (tmp_path / "trace.txt").write_text("1\n")
    sc = load_scenario(write(tmp_path, text))
    assert sc.fleet.pools[0].name == "work"

    fleet.write_text(
        "pools:\n  - name: work\n    capability: work\n"
        "    agent_class: fleet.agents.examples:NoopAgent\n    colour: red\n"
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    ((path, line, reason),) = info.value.errors
    assert path == f"fleet_file -> {fleet}:5: pools.0.colour"
    assert line == 2
    assert "unknown field" in reason


def test_yaml_syntax_error_has_a_line(tmp_path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, "name: x\npools: [\n"))
    assert info.value.errors[0][0] == "<yaml>"
    assert info.value.errors[0][1] is not None


def test_yaml_merge_keys_are_followed_for_lines(tmp_path):
    text = """\
    name: merged
    fleet:
      pools:
        - name: work
          capability: work
          agent_class: fleet.agents.examples:NoopAgent
    defaults: &d
      service: {kind: exponential, mean_s: -1}
    pools:
      work:
        <<: *d
    workload:
      - {pool: work, arrivals: {kind: poisson, rate_per_s: 1}}
    max_tasks: 10
    """
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    errs = {p: line for p, line, _ in info.value.errors}
    assert errs["defaults"] == 7  # not part of the spec
    assert errs["pools.work.service.mean_s"] == 8  # found through the merge key


def test_infinite_rate_is_rejected(tmp_path):
    err = bad(tmp_path, rate=".inf")
    ((path, line, reason),) = err.errors
    assert (path, line) == ("workload.0.arrivals.rate_per_s", 14)
    assert "finite" in reason
