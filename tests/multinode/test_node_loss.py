"""A fleet on a local multi-node cluster (a head and worker nodes, each a raylet of its
own, on loopback): hosts spread over the workers; a worker killed mid-run loses nothing
and its hosts come back on the survivors; a killed queue shard and ledger restart on
the storage node (the head) with their data; a drained worker's hosts finish their
work (nothing redelivered) and move to other nodes.

The scenario is ``fleet.bench.multinode.node_loss`` (the same code as the benchmark),
run in a subprocess: it starts a cluster of its own, and this process is already
connected to the session's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FULL_TASKS = 20_000


def _node_loss(tasks: int, timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [sys.executable, "-m", "fleet.bench.multinode", "node-loss", "--tasks", str(tasks)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def _check(report: dict, tasks: int) -> None:
    start = report["hosts_per_node_at_start"]
    assert "head" not in start and len(start) == report["workers"], start  # spread
    assert sum(start.values()) == report["hosts"]
    assert set(report["storage_actors"].values()) == {"head"}, report["storage_actors"]
    for phase in ("crash", "control", "drain"):
        r = report[phase]
        assert r["tasks"] == tasks
        assert r["lost"] == 0, phase
        assert r["samples"][-1][1] == tasks, phase
    crash = report["crash"]
    assert crash["hosts_back_s"] is not None, crash.get("hosts_back_error")
    assert crash["hosts_per_node_after"] == {"worker1": report["hosts"]}
    control = report["control"]
    assert control["restarted_on"] == {
        "multinode.queue.work.0": "head",
        "multinode.ledger": "head",
    }
    assert set(control["restarts"].values()) == {1}, control["restarts"]
    drain = report["drain"]
    assert drain["redelivered"] == 0, "a drained node's hosts finish what they hold"
    assert "hosts_moved_error" not in drain, drain.get("hosts_moved_error")
    assert drain["hosts_per_node_after"] == {"worker2": report["hosts"]}


# Full size only, in `make test-slow` (CI runs it): a second cluster of three raylets
# takes a minute even at 1,500 tasks, which `make test` cannot spare on two cores.
@pytest.mark.slow
def test_node_loss_at_full_size():
    _check(_node_loss(FULL_TASKS, 1800), FULL_TASKS)
