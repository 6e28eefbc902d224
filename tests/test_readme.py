"""Every example in README.md runs: the spec parses, the Python examples run against
the session's Ray cluster, and each shell command is run by the test named here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fleet.spec import parse_spec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
# Shell examples and the tests that run them (each is too slow or too large to repeat).
SHELL_COVERED_BY = {
    "make demo": "tests/test_demo.py (the demo workload, smaller)",
    "make test": "this suite",
    "serve run serve_configs/demo.yaml": "tests/deploy/test_serve_live.py (serve run of a "
    "shipped config, then POST/GET over HTTP)",
    "curl": "tests/deploy/test_serve_live.py",
    "ray job submit": "tests/deploy/test_serve_live.py",
    "fleet simulate": "tests/sim/test_cli.py",
    "ray start": "tests/deploy/test_job_detach_live.py (a ray start --head cluster)",
    "fleet list": "tests/deploy/test_job_detach_live.py, tests/runtime/test_manage_live.py",
    "fleet apply": "tests/runtime/test_manage_live.py",
    "fleet stop": "tests/deploy/test_job_detach_live.py, tests/runtime/test_manage_live.py",
    "fleet rules": "tests/observability/test_rules.py (the committed rules are the demo's)",
    "prometheus --config.file": "tests/observability/test_prometheus_live.py (the shipped "
    "config, on the session cluster's service-discovery file)",
}


def _blocks(lang: str) -> list[str]:
    return [code for kind, code in BLOCKS if kind == lang]


def test_every_shell_example_is_covered():
    lines = [
        ln.strip()
        for code in _blocks("sh")
        for ln in code.splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    uncovered = [
        ln
        for ln in lines
        if not ln.startswith(("-d ", "--"))
        and not any(ln.startswith(cmd) for cmd in SHELL_COVERED_BY)
    ]
    assert lines and uncovered == [], uncovered


def test_the_spec_example_is_a_valid_spec():
    (spec,) = _blocks("yaml")
    parsed = parse_spec(yaml.safe_load(spec), "README.md")
    assert parsed.name == "shop" and parsed.results.retention_s == 7 * 24 * 3600


def test_the_agent_example_defines_an_agent():
    (agent_code, *_) = [c for c in _blocks("python") if "class Summarizer" in c]
    ns: dict = {}
    exec(compile(agent_code, "README.md", "exec"), ns)
    from fleet import Agent

    assert issubclass(ns["Summarizer"], Agent)
    assert ns["Summarizer"].capabilities == ("summarize",)


@pytest.mark.ray
def test_the_python_example_runs(ray_cluster, capsys):
    (code,) = [c for c in _blocks("python") if "FleetClient.start" in c]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "task_id=" in out and "status=<TaskStatus." in out, out


def test_the_consensus_example_runs(capsys):
    (code,) = [c for c in _blocks("python") if "decide(" in c]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()  # Ray's own warnings may come first
    printed = [ln.split() for ln in out if len(ln.split()) == 4]
    assert printed and printed[-1][1] in {"quorum", "confidence", "timeout", "tie_break"}, out
