"""Idempotency that holds: a task whose id or idempotency_key already has an outcome is
answered with it and not run again; the same key with another payload is refused, over
the Python API and the CLI (HTTP: tests/deploy/test_serve_live.py)."""

from __future__ import annotations

import json
import uuid

import pytest
import ray

from fleet.cli.main import main as cli
from fleet.task import IdempotencyConflict
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray
N = 1_000


def _enqueued(fc) -> int:
    return sum(
        s["enqueued_total"] for s in ray.get([s.stats.remote() for s in fc._shards["work"]])
    )


def test_resubmitted_completed_tasks_run_none_again(start_fleet, tmp_path, capsys):
    spec = make_spec(
        pool(
            "work",
            agent_class="fleet.agents.testing:SleepAgent",
            agent_kwargs={"delay_s": 0.0},
            cpus_per_host=0,
            autoscaling={"min_agents": 20, "max_agents": 20},
        ),
        name="idem",
        namespace=f"fleet-idem-{uuid.uuid4().hex[:6]}",
    )
    fc = start_fleet(spec)
    by_id = [{"id": f"done-{k}", "capability": "work", "payload": {"k": k}} for k in range(N)]
    by_key = [
        {"idempotency_key": f"key-{k}", "capability": "work", "payload": {"k": -k}}
        for k in range(N)
    ]
    first = fc.submit(by_id + by_key)
    assert first.existing == {}
    assert fc.wait(first.accepted, 120) == []
    before = {r.task_id: r for r in fc.results(first.accepted)}
    enqueued = _enqueued(fc)

    # Again, by id and by key (a new Task object each, so new default ids for the keyed).
    again = fc.submit([dict(t) for t in by_id] + [dict(t) for t in by_key])
    assert again.accepted == first.accepted
    assert set(again.existing) == set(first.accepted)
    assert again.existing == before, "the answer is the recorded outcome"
    assert _enqueued(fc) == enqueued, "nothing was queued, so nothing ran again"
    assert fc.ledger.duplicates(first.accepted) == {}

    # The same key with another payload: refused, naming the key; nothing queued.
    with pytest.raises(IdempotencyConflict, match=r"'key-7'.*different payload"):
        fc.submit(
            [
                {"idempotency_key": "key-7", "capability": "work", "payload": {"k": 1}},
                {"id": "innocent", "capability": "work", "payload": {}},
            ]
        )
    assert _enqueued(fc) == enqueued

    # A key still pending with another payload is refused by its queue shard.
    slow = {"idempotency_key": "slow-key", "capability": "work", "payload": {"sleep_s": 3}}
    fc.submit([slow])
    with pytest.raises(IdempotencyConflict, match="'slow-key'"):
        fc.submit([{**slow, "payload": {"sleep_s": 1}}])
    assert fc.submit([slow]).existing == {}, "the same pending task is accepted once"

    # The CLI: already-recorded tasks are reported, a conflicting key is a clear error.
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in by_id[:10]) + "\n")
    args = ["submit", str(path), "--fleet", spec.name, "--namespace", spec.namespace]
    assert cli([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["submitted"], out["already_recorded"]) == (10, 10)
    path.write_text(
        json.dumps({"idempotency_key": "key-3", "capability": "work", "payload": {"k": 99}})
        + "\n"
    )
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "idempotency_key 'key-3' already used with a different payload" in err
    assert _enqueued(fc) == enqueued + 1  # only slow-key was ever queued again
