"""The ``fleet`` command's contract: exit codes (0 done, 1 not completed, 2 bad input, 3
cannot reach the cluster or the fleet, 130 interrupted), errors as one ``fleet: <cause>``
line on stderr (``--debug``: the traceback), no ``\\r`` progress unless stderr is a
terminal, and ``--fleet``/``--namespace`` found on the cluster when left out."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import uuid

import pytest

from fleet.cli import common, keys
from fleet.cli.common import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    failure,
    progress_printer,
    resolve_fleet,
)
from fleet.cli.main import main
from fleet.spec import SpecError
from tests.utils import make_spec, pool

CLI = [sys.executable, "-m", "fleet.cli.main"]
SUBPROCESS_TIMEOUT_S = 45  # bounds a CLI that would hang (Ray retries an address for minutes)


def _error_line(err: str) -> str:
    """The one line an error prints (fails unless it is exactly one ``fleet:`` line)."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet: "), err
    return lines[0]


def _closed_port() -> int:
    """A port nothing listens on, on any interface (Ray may dial the node's IP instead of
    127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- without a cluster ---------------------------------------------------------------------


def test_progress_is_drawn_only_on_a_terminal():
    tty, pipe = _Terminal(), io.StringIO()
    for stream in (tty, pipe):
        show = progress_printer("tasks", True, stream=stream)
        show(1, 2)
        show(2, 2)
    assert tty.getvalue() == "\rtasks: 1/2 (50%)\rtasks: 2/2 (100%)\n"
    assert pipe.getvalue() == ""
    quiet = _Terminal()
    progress_printer("tasks", False, stream=quiet)(1, 2)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize(
    ("exc", "code", "cause"),
    [
        (CliError("3 invalid task(s)", EXIT_USAGE), EXIT_USAGE, "3 invalid task(s)"),
        (CliError("missing", EXIT_INCOMPLETE), EXIT_INCOMPLETE, "missing"),
        (ConnectionError("cannot reach 10.0.0.1:6379"), EXIT_UNREACHABLE, "10.0.0.1:6379"),
        (LookupError("no fleet named 'x'"), EXIT_UNREACHABLE, "no fleet named 'x'"),
        (TimeoutError("no answer"), EXIT_UNREACHABLE, "no answer"),
        (
            SpecError("s.yaml", [("pools.0.name", "bad"), ("queues", "worse")]),
            EXIT_USAGE,
            "invalid fleet spec s.yaml: pools.0.name: bad; queues: worse",
        ),
        (FileNotFoundError(2, "No such file or directory", "t.jsonl"), EXIT_USAGE, "t.jsonl"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
        (KeyError("pools"), EXIT_INCOMPLETE, "unexpected KeyError: 'pools'"),  # a bug
        (RuntimeError("boom"), EXIT_INCOMPLETE, "unexpected RuntimeError: boom"),
    ],
)
def test_exceptions_map_to_an_exit_code_and_one_line(exc, code, cause):
    got_code, got_cause = failure(exc)
    assert got_code == code and cause in got_cause and "\n" not in got_cause


def test_fleet_errors_map_to_their_exit_codes():
    from fleet.runtime.deploy import PoolUnschedulable
    from fleet.runtime.enqueue import QueueFullError
    from fleet.task import IdempotencyConflict

    assert failure(PoolUnschedulable("pool 'gpu' is unschedulable"))[0] == EXIT_UNREACHABLE
    assert failure(QueueFullError("queue full"))[0] == EXIT_INCOMPLETE
    assert failure(IdempotencyConflict(["idem-k"]))[0] == EXIT_USAGE


def test_an_actors_exception_is_judged_and_shown_by_its_cause():
    from ray.exceptions import RayTaskError

    from fleet.task import IdempotencyConflict

    remote = RayTaskError(
        "put", "Traceback (most recent call last):\n  ...", IdempotencyConflict(["idem-k"])
    )
    for exc in (remote, remote.as_instanceof_cause()):  # as ray.get raises it
        code, cause = failure(exc)
        assert code == EXIT_USAGE and cause.startswith("idempotency_key 'k' already used")


def test_exit_0_and_one_json_object(tmp_path, capsys):
    path = str(tmp_path / "keys.json")
    create = ["keys", "create", "--keys-file", path, "--tenant", "acme", "--role", "read"]
    assert main([*create, "--json"]) == EXIT_OK
    made = json.loads(capsys.readouterr().out)
    assert main(["keys", "revoke", "--keys-file", path, made["id"], "--json"]) == EXIT_OK
    revoked = json.loads(capsys.readouterr().out)
    assert (revoked["id"], revoked["active"]) == (made["id"], False)


def test_exit_2_for_malformed_task_lines_in_one_line(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"capability": "work"}\n{not json\n[1]\n')
    assert main(["submit", str(tasks), "--address", "127.0.0.1:1"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    line = _error_line(err)
    assert "2 malformed line(s), nothing submitted" in line
    assert "line 2: malformed JSON" in line and "line 3: expected a JSON object" in line
    assert out == ""


def test_exit_2_for_a_bad_spec_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "pools:\n  - name: a\n    capability: a\n    agent_class: m:C\n"
        "    autoscaling: {min_agents: 9, max_agents: 1}\n"
    )
    assert main(["run", str(bad)]) == EXIT_USAGE
    line = _error_line(capsys.readouterr().err)
    assert "pools.0.autoscaling: min_agents (9) must be <= max_agents (1)" in line


def test_keys_need_to_know_which_fleet(monkeypatch, capsys):
    monkeypatch.delenv("FLEET_KEYS_FILE", raising=False)
    assert main(["keys", "list"]) == EXIT_USAGE
    assert "--fleet NAME" in _error_line(capsys.readouterr().err)


def test_debug_prints_the_traceback_instead(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert main(["submit", missing]) == EXIT_USAGE
    assert _error_line(capsys.readouterr().err) == (
        f"fleet: {missing}: No such file or directory"
    )
    assert main(["--debug", "submit", missing]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "FileNotFoundError" in err and "read_tasks" in err


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(keys, "_list", interrupted)
    assert main(["keys", "list", "--keys-file", str(tmp_path / "k.json")]) == EXIT_INTERRUPTED
    assert _error_line(capsys.readouterr().err) == "fleet: interrupted"


def test_resolve_fleet_fills_in_what_was_left_out(monkeypatch):
    from fleet.runtime import fleets
    from fleet.runtime.fleets import FleetRef

    def args(fleet=None, namespace=None):
        return type("Args", (), {"fleet": fleet, "namespace": namespace})()

    running = [FleetRef("shop", "prod"), FleetRef("shop", "staging"), FleetRef("demo", "d")]
    monkeypatch.setattr(fleets, "running_fleets", lambda: running)
    assert resolve_fleet(args("demo")) == FleetRef("demo", "d")
    assert resolve_fleet(args(namespace="staging")) == FleetRef("shop", "staging")
    spec = make_spec(pool(), name="shop", namespace="prod")
    assert resolve_fleet(args(), spec) == FleetRef("shop", "prod")
    assert resolve_fleet(args("x", "y")) == FleetRef("x", "y")  # as given: connect checks
    with pytest.raises(CliError, match="name one with --fleet and --namespace") as several:
        resolve_fleet(args("shop"))
    assert several.value.code == EXIT_USAGE
    with pytest.raises(LookupError, match="no fleet named 'nope' runs on this cluster"):
        resolve_fleet(args("nope"))
    monkeypatch.setattr(fleets, "running_fleets", list)
    with pytest.raises(LookupError, match=r"^no fleet runs on this cluster \(start one"):
        resolve_fleet(args())


def test_exit_3_when_the_address_is_unreachable_one_line_and_fast():
    address = f"127.0.0.1:{_closed_port()}"
    r = subprocess.run(
        [*CLI, "status", "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert r.returncode == EXIT_UNREACHABLE, r.stderr
    line = _error_line(r.stderr)
    assert f"cannot reach the Ray cluster at {address}" in line
    assert r.stdout == ""


# -- on the session's cluster --------------------------------------------------------------


def _fleet(start_fleet):
    spec = make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:SleepAgent",
            agent_kwargs={"delay_s": 0.0},
            cpus_per_host=0,
            autoscaling={"min_agents": 2, "max_agents": 2},
        ),
        name="cli",
        namespace=f"fleet-cli-{uuid.uuid4().hex[:6]}",
    )
    return start_fleet(spec)


@pytest.mark.ray
def test_the_only_running_fleet_is_the_default(start_fleet, capsys):
    from fleet.runtime.fleets import FleetRef, running_fleets

    fc = _fleet(start_fleet)
    ref = FleetRef(fc.spec.name, fc.spec.namespace)
    assert running_fleets() == [ref], "the test needs this fleet to be the only one"
    assert main(["status", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["fleet"] == ref.name
    assert main(["status", "--fleet", ref.name, "--json"]) == EXIT_OK  # its namespace found
    assert json.loads(capsys.readouterr().out)["fleet"] == ref.name


@pytest.mark.ray
def test_exit_3_when_no_such_fleet(ray_cluster, tmp_path, capsys):
    fleet, namespace = "no-such-fleet", "nowhere"
    assert main(["status", "--fleet", fleet, "--namespace", namespace]) == EXIT_UNREACHABLE
    line = _error_line(capsys.readouterr().err)
    assert f"no fleet named {fleet!r} in namespace {namespace!r}" in line
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"capability": "work"}) + "\n")
    assert main(["submit", str(tasks), "--fleet", fleet]) == EXIT_UNREACHABLE
    assert "no fleet named 'no-such-fleet'" in _error_line(capsys.readouterr().err)


@pytest.mark.ray
def test_exit_1_when_submit_wait_leaves_tasks_missing(start_fleet, tmp_path, capsys):
    fc = _fleet(start_fleet)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"capability": "work", "payload": {"sleep_s": 2}}) + "\n")
    where = ["--fleet", fc.spec.name, "--namespace", fc.spec.namespace]
    # A 2 s task cannot have an outcome when a wait of 0 s looks.
    rc = main(["submit", str(tasks), *where, "--wait", "--timeout-s", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == EXIT_INCOMPLETE and (out["submitted"], out["missing"]) == (1, 1)


@pytest.mark.ray
def test_piped_output_carries_no_carriage_return(start_fleet, ray_cluster, tmp_path):
    fc = _fleet(start_fleet)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"capability": "work"}) + "\n" for _ in range(20)))
    r = subprocess.run(
        [
            *CLI,
            "submit",
            str(tasks),
            "--wait",  # without --json: progress on a terminal, none into a pipe
            "--address",
            ray_cluster.address_info["gcs_address"],
            "--fleet",
            fc.spec.name,
            "--namespace",
            fc.spec.namespace,
        ],
        capture_output=True,  # bytes: text mode would turn each \r into \n
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert r.returncode == EXIT_OK, r.stderr.decode()
    assert r.stdout.startswith(b"submitted 20 task(s)")
    assert b"\r" not in r.stdout and b"\r" not in r.stderr
    assert b"tasks:" not in r.stderr


def test_exit_codes_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert common.EXIT_CODES_HELP in capsys.readouterr().out


def test_a_bench_option_the_suite_does_not_take_is_refused(capsys):
    # Before any cluster is touched: `ingress` measures authentication, not admission.
    assert main(["bench", "ingress", "--admission"]) == EXIT_USAGE
    assert "suite 'ingress' takes no --admission" in _error_line(capsys.readouterr().err)
