"""A deep queue keeps every host of a pool busy: the dispatcher leases at most one
host's slots per batch (a batch runs on one host), so the work of a burst is spread over
the hosts instead of queueing inside one of them while the others idle."""

from __future__ import annotations

import uuid

import pytest

from fleet.stats import most_at_once
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray

HOSTS, AGENTS_PER_HOST, TASK_S = 3, 2, 0.1
TASKS = 60  # deep: far more than the pool's 6 slots


def test_a_burst_runs_on_every_host_at_once(start_fleet):
    agents = HOSTS * AGENTS_PER_HOST
    fc = start_fleet(
        make_spec(
            pool(
                "work",
                agent_class="fleet.agents.testing:SleepAgent",
                agent_kwargs={"delay_s": TASK_S},
                agents_per_host=AGENTS_PER_HOST,
                cpus_per_host=0,
                autoscaling={"min_agents": agents, "max_agents": agents},
            ),
            name="spread",
            namespace=f"fleet-spread-{uuid.uuid4().hex[:6]}",
            queues={"shards": 1},
        )
    )
    ids = [f"b{i}" for i in range(TASKS)]
    fc.submit([{"capability": "work", "id": i, "payload": {}} for i in ids])
    assert fc.wait(ids, timeout_s=120) == []
    results = fc.results(ids)
    # Batches of all 6 slots would each run 2 at a time on one host (its 2 agents).
    assert (
        most_at_once([(r.started_unix_s, r.finished_unix_s) for r in results])
        >= 2 * AGENTS_PER_HOST
    )
    assert len({r.agent_id.rsplit("/", 1)[0] for r in results}) > 1, "more than one host ran"
