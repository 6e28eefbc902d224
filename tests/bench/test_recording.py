"""The recording benchmark, small: every outcome is seen in the ledger, and the figures
(finish to recorded) are sane."""

from __future__ import annotations

import pytest

from fleet.bench.recording import durations, run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CLOCK_TOLERANCE_S = 0.01  # hosts and driver read the same clock


def test_durations_are_seeded_and_in_range():
    d = durations(1_000, 0.05, 1.0, seed=3)
    assert d == durations(1_000, 0.05, 1.0, seed=3)
    assert all(0.05 <= x <= 1.0 for x in d)
    assert d != durations(1_000, 0.05, 1.0, seed=4)


@pytest.mark.timeout(120)
def test_a_small_run_sees_every_outcome_after_its_finish(ray_cluster):
    r = run(tasks=200, max_sleep_s=0.3, submit_s=2.0, agents=50)
    assert (r["tasks"], r["recorded"], r["lost"], r["failed"]) == (200, 200, 0, 0)
    assert r["sleep_s"] == [0.05, 0.3]
    assert r["resolution_s"] == r["poll_s"] == 0.02
    assert len(r["loadavg_at_start"]) == 3 and isinstance(r["seed"], int)
    lat = r["finish_to_recorded_s"]
    assert lat["min"] >= -CLOCK_TOLERANCE_S
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["max"] < 30
    import ray

    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "fleet-bench-recording"
    ]
    assert left == [], left
