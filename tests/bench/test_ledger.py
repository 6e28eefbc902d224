"""The ledger benchmark's outcomes: realistic, reproducible, of the stated size."""

from __future__ import annotations

import orjson

from fleet.bench.ledger import OUTPUT_BYTES, outcome, output, task_id


def test_outputs_are_distinct_json_of_exactly_the_stated_size():
    outs = [output(k) for k in (0, 1, 999_999, 12_345_678)]
    assert all(len(o) == OUTPUT_BYTES for o in outs)
    assert [orjson.loads(o)["n"] for o in outs] == [0, 1, 999_999, 12_345_678]
    assert len(set(outs)) == len(outs)


def test_ids_look_like_fleet_ids_and_can_be_derived_again():
    ids = [task_id(k) for k in range(1_000)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert task_id(7) == task_id(7)


def test_an_outcome_is_a_completed_task_with_its_id_and_output():
    o = outcome(42, now=1_000.0)
    assert (o.task_id, o.ok, o.output, o.finished_unix_s) == (
        task_id(42),
        True,
        output(42),
        1_000.0,
    )
    assert o.submitted_unix_s < o.started_unix_s < o.finished_unix_s
