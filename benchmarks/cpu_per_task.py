"""CPU time per task, by process, over a whole local cluster (BENCHMARKS.md,
"Observability"): the core benchmark's fleet on the durable defaults, 60,000 no-op tasks
twice, and the CPU seconds every process of the cluster spent meanwhile (``psutil``
over this driver's process tree), divided by the tasks.

    PYTHONPATH=<checkout> .venv/bin/python benchmarks/cpu_per_task.py

Less noisy than tasks per second on a shared 2-core machine: it says where the CPU goes.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import psutil
import ray

from fleet.bench.core import _fleet_throughput, bench_spec
from fleet.runtime.client import FleetClient, init_ray

TASKS = 60_000
RUNS = 2


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t, cmd = p.cpu_times(), p.cmdline()
            out[p.pid] = ((cmd[0] if cmd else p.name()).split(" ")[0][:40], t.user + t.system)
        except psutil.Error:
            pass
    return out


def main() -> list[dict[str, Any]]:
    init_ray(None, dashboard=False)
    out = []
    with tempfile.TemporaryDirectory() as d:
        fc = FleetClient.start(bench_spec(storage={"backend": "sqlite", "directory": d}))
        try:
            _fleet_throughput(fc, 5_000)  # warm up
            for _ in range(RUNS):
                before = _cpu_by_process()
                t0 = time.time()
                r = _fleet_throughput(fc, TASKS)
                after = _cpu_by_process()
                groups: dict[str, float] = {}
                for pid, (name, cpu) in after.items():
                    spent = cpu - before.get(pid, (name, 0.0))[1]
                    groups[name] = groups.get(name, 0.0) + spent
                out.append(
                    {
                        "tasks_per_s": round(r["tasks_per_s"]),
                        "wall_s": round(time.time() - t0, 1),
                        "lost": r["lost"],
                        "cpu_us_per_task": round(sum(groups.values()) / TASKS * 1e6, 1),
                        "by_process_us_per_task": {
                            k: round(v / TASKS * 1e6, 1)
                            for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:9]
                        },
                    }
                )
        finally:
            fc.shutdown()
    ray.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
