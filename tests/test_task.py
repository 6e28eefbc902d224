"""Submit-time validation: every bad task is rejected with the field at fault."""

from __future__ import annotations

import pytest

from fleet.task import Item, TaskRejected, parse_task_json, to_item

CAPS = frozenset({"support", "checkout"})


@pytest.mark.parametrize(
    "task,field,needle",
    [
        ({"capability": "nope"}, "capability", "unknown capability 'nope'"),
        ({"capability": "support", "priority": 10}, "priority", "less than or equal to 9"),
        ({"capability": "support", "priority": -1}, "priority", "greater than or equal to 0"),
        ({"capability": "support", "payload": "x" * 100}, "payload", "over the limit of 64"),
        ({"capability": "support", "payload": {1, 2}}, "payload", "not JSON-serializable"),
        ({"capability": "support", "deadline_unix_s": 1.0}, "deadline_unix_s", "already past"),
        ({"capability": "support", "colour": "red"}, "colour", "unknown field"),
        ({"priority": 1}, "capability", "Field required"),
        ("text", "<task>", "expected a JSON object"),
    ],
)
def test_rejections_name_the_field(task, field, needle):
    with pytest.raises(TaskRejected) as exc:
        to_item(task, CAPS, max_payload_bytes=64)
    assert exc.value.field == field
    assert needle in str(exc.value)


def test_valid_task_becomes_item_and_idempotency_key_fixes_the_id():
    it = to_item(
        {"capability": "checkout", "payload": {"a": 1}, "idempotency_key": "k1"}, CAPS
    )
    assert isinstance(it, Item) and it.id == "idem-k1" and it.payload == b'{"a":1}'
    assert to_item({"capability": "checkout", "idempotency_key": "k1"}, CAPS).id == it.id


def test_malformed_json_is_rejected_with_where():
    with pytest.raises(TaskRejected, match="line 3: malformed JSON"):
        parse_task_json("{not json", where="line 3")
    with pytest.raises(TaskRejected, match="expected a JSON object"):
        parse_task_json("[1, 2]")


def test_queue_full_survives_pickling_as_ray_reraises_it():
    import pickle

    from fleet.queue.lease_queue import QueueFull

    err = pickle.loads(pickle.dumps(QueueFull(10, 10)))
    assert isinstance(err, QueueFull) and (err.depth, err.max_depth) == (10, 10)


def test_a_tenant_scopes_the_id_and_an_unscoped_caller_cannot_forge_one():
    from fleet.task import scoped_id, split_scoped, tenant_of_id

    a = to_item({"capability": "checkout", "id": "same"}, CAPS, tenant="acme")
    b = to_item({"capability": "checkout", "id": "same"}, CAPS, tenant="globex")
    assert a.id == "@acme:same" and b.id == "@globex:same" and a.id != b.id
    keyed = to_item({"capability": "checkout", "idempotency_key": "k"}, CAPS, tenant="acme")
    assert keyed.id == "@acme:idem-k"
    assert split_scoped(a.id) == ("acme", "same") and tenant_of_id(b.id) == "globex"
    assert split_scoped("@x:y:z") == ("x", "y:z")  # the tenant ends at the first ':'
    assert split_scoped("plain") == (None, "plain") and tenant_of_id("@nocolon") is None
    assert scoped_id("acme", "@weird") == "@acme:@weird"
    with pytest.raises(TaskRejected) as exc:
        to_item({"capability": "checkout", "id": "@acme:same"}, CAPS)
    assert exc.value.field == "id" and "reserved" in exc.value.reason


def test_an_idempotency_id_is_recognized_scoped_or_not():
    from fleet.task import is_idempotent_id

    assert is_idempotent_id("idem-k") and is_idempotent_id("@acme:idem-k")
    assert not is_idempotent_id("@acme:k") and not is_idempotent_id("k-idem-")
