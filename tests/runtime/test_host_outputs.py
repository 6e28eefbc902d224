"""What a host records: an output over ``results.max_output_bytes`` fails its task with
``output_too_large`` (recorded, the rest of the batch unharmed); a task with an
idempotency key carries its payload's hash into the ledger. And a fleet whose storage
directory cannot be written fails at start, naming it, before anything is created."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ray

from fleet.queue.storage import StorageError
from fleet.runtime.client import FleetClient
from fleet.runtime.host import AgentHost
from fleet.task import payload_hash, to_item
from tests.utils import FakeLedger, make_spec, pool


def _host(max_output_bytes: int) -> tuple[AgentHost, FakeLedger]:
    spec = pool(
        "work",
        agent_class="fleet.agents.testing:SleepAgent",
        agents_per_host=4,
        agent_kwargs={"delay_s": 0.0},
        autoscaling={"min_agents": 4, "max_agents": 4},
    )
    host = AgentHost(spec, {"retry": {"max_attempts": 1}}, max_output_bytes=max_output_bytes)
    ledger = FakeLedger()
    host.recorder.client = ledger
    return host, ledger


def test_an_output_over_the_cap_fails_its_task_and_only_its_task():
    host, ledger = _host(max_output_bytes=1_000)
    small = to_item({"capability": "work", "payload": {"text": "x" * 100}}, {"work"})
    big = to_item({"capability": "work", "payload": {"text": "x" * 5_000}}, {"work"})
    report = asyncio.run(host.run_and_record([small, big]))
    assert report.recorded == 2 and report.retry_ids == []
    by_id = {o.task_id: o for o in ledger.outcomes}
    assert by_id[small.id].ok
    failed = by_id[big.id]
    assert (failed.ok, failed.reason) == (False, "output_too_large")
    assert "over results.max_output_bytes=1000" in failed.error


def test_keyed_tasks_carry_their_payload_hash_to_the_ledger():
    host, ledger = _host(max_output_bytes=1_000_000)
    keyed = to_item(
        {"capability": "work", "idempotency_key": "k1", "payload": {"a": 1}}, {"work"}
    )
    plain = to_item({"capability": "work", "payload": {"a": 1}}, {"work"})
    asyncio.run(host.run_and_record([keyed, plain]))
    by_id = {o.task_id: o for o in ledger.outcomes}
    assert by_id["idem-k1"].payload_hash == payload_hash(keyed.payload)
    assert by_id[plain.id].payload_hash is None


@pytest.mark.ray
def test_a_storage_directory_that_cannot_be_written_fails_at_start(ray_cluster, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # even root cannot make a directory under it
    ns = f"fleet-unwritable-{uuid.uuid4().hex[:6]}"
    spec = make_spec(
        pool(), namespace=ns, queues={"storage": {"directory": str(blocker / "queues")}}
    )
    with pytest.raises(
        StorageError,
        match=r"storage directory .*a-file/queues.* is not "
        r"writable.*queues.storage.directory",
    ):
        FleetClient.start(spec)
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]
    assert left == [], "nothing is created before the storage is checked"
