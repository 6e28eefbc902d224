"""A driver for the whole-cluster restart test, run once per cluster.

``first``: starts the fleet in SPEC (detached) on the cluster at RAY_ADDRESS, submits
TASKS tasks (ids ``cr-<k>``, 20-60 ms each), waits until a third of them are
recorded, writes those ids and their results to STATE, and exits (the fleet runs on).
``second``: on a new cluster, starts the same spec again (same storage directory),
waits for every task and prints one JSON line comparing the ledger with STATE.

Run: python -m tests.runtime.cluster_restart_worker first|second SPEC STATE TASKS
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import ray

from fleet.runtime.client import FleetClient
from fleet.spec import parse_spec
from tests.utils import eventually


def main() -> int:
    phase, spec_path, state_path, tasks = (
        sys.argv[1],
        sys.argv[2],
        sys.argv[3],
        int(sys.argv[4]),
    )
    spec = parse_spec(json.loads(Path(spec_path).read_text()))
    ray.init(namespace=spec.namespace, log_to_driver=False, configure_logging=False)
    ids = [f"cr-{k}" for k in range(tasks)]
    if phase == "first":
        fc = FleetClient.start(spec, detached=True)
        rng = random.Random(7)
        fc.submit(
            [
                {
                    "id": i,
                    "capability": "work",
                    "payload": {"sleep_s": round(rng.uniform(0.02, 0.06), 3)},
                }
                for i in ids
            ]
        )
        try:
            eventually(
                lambda: len(ids) - len(fc.ledger.missing(ids)) >= tasks // 3,
                120,
                what="a third recorded",
            )
        except AssertionError as exc:
            print(exc, file=sys.stderr)
            return 1
        missing = set(fc.ledger.missing(ids))
        done = [i for i in ids if i not in missing]
        Path(state_path).write_text(
            json.dumps(
                {"recorded": {r.task_id: r.model_dump(mode="json") for r in fc.results(done)}}
            )
        )
        print(f"RECORDED {len(done)}", flush=True)
        return 0
    state = json.loads(Path(state_path).read_text())["recorded"]
    fc = FleetClient.start(spec)
    missing = fc.wait(ids, 180)
    before = list(state)
    after = {r.task_id: r.model_dump(mode="json") for r in fc.results(before) if r}
    s = fc.summary(ids)
    print(
        json.dumps(
            {
                "lost": len(missing),
                "recorded": s["recorded"],
                "recorded_before_stop": len(before),
                "changed": sum(1 for i in before if after.get(i) != state[i]),
                "duplicate_executions": s["duplicate_executions"],
                "rerun_after_recorded": len(fc.ledger.duplicates(before)),
                "failures": s["failure_reasons"],
            }
        ),
        flush=True,
    )
    fc.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
