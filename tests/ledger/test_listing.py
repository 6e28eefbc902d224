"""Listing a tenant's outcomes across ledger shards: every outcome exactly once, page by
page, in finish order within what each shard's record order allows."""

from __future__ import annotations

import random

import pytest

from fleet.ledger.store import MemoryLedgerStore
from fleet.policy.sharding import shard_of
from fleet.runtime.ledger import merge_owned
from fleet.task import Outcome


def _outcome(task_id: str, finished: float, ok: bool = True) -> Outcome:
    return Outcome(
        task_id,
        ok,
        b"1" if ok else None,
        None if ok else "error",
        None,
        "a/0",
        "p",
        1,
        1.0,
        2.0,
        finished,
    )


def _pages(shards, owner, before, limit, ok=None):
    return [s.owned(owner, b, limit, ok) for s, b in zip(shards, before)]


@pytest.mark.parametrize("seed", range(5))
def test_paging_lists_every_outcome_of_the_tenant_once(seed):
    rng = random.Random(seed)
    n_shards = rng.randint(1, 4)
    shards = [MemoryLedgerStore() for _ in range(n_shards)]
    recorded: dict[str, list[str]] = {"a": [], "b": []}
    for k in range(rng.randint(0, 300)):
        tenant = rng.choice("ab")
        tid = f"@{tenant}:{k}"
        # finish times mostly rise with record order, with some out of order
        o = _outcome(tid, k + rng.uniform(-5, 5), ok=rng.random() < 0.7)
        shards[shard_of(tid, n_shards)].record([o])
        recorded[tenant].append(tid)
    for ok in (None, True, False):
        limit = rng.randint(1, 20)
        seen: list[Outcome] = []
        before: list[int | None] | None = [None] * n_shards
        calls = 0
        while before is not None:
            page, before = merge_owned(_pages(shards, "a", before, limit, ok), before, limit)
            assert len(page) <= limit
            assert page or before is None, "an empty page ends the listing"
            seen.extend(page)
            calls += 1
            assert calls < 400
        ids = [o.task_id for o in seen]
        want = [
            i
            for i in recorded["a"]
            if ok is None or shards[shard_of(i, n_shards)].get([i])[0].ok == ok
        ]
        assert sorted(ids) == sorted(want) and len(set(ids)) == len(ids)
        if n_shards == 1:  # one shard: newest recorded first
            assert ids == want[::-1]


def test_a_page_is_ordered_by_finish_time_across_shards():
    shards = [MemoryLedgerStore(), MemoryLedgerStore()]
    shards[0].record([_outcome("@a:0", 10.0), _outcome("@a:2", 30.0)])
    shards[1].record([_outcome("@a:1", 20.0), _outcome("@a:3", 40.0)])
    page, before = merge_owned(_pages(shards, "a", [None, None], 3), [None, None], 3)
    assert [o.task_id for o in page] == ["@a:3", "@a:2", "@a:1"]
    assert before == [2, 1]
    page, before = merge_owned(_pages(shards, "a", before, 3), before, 3)
    assert [o.task_id for o in page] == ["@a:0"] and before is None


def test_a_cursor_comes_back_as_given_and_anything_else_is_refused():
    from fleet.runtime.listing import FINISHED, PENDING, BadCursor, Cursor

    for c, status in [
        (Cursor("", PENDING, after="@a:x"), None),
        (Cursor("pending", PENDING, after=""), "pending"),
        (Cursor("failed", FINISHED, before=(3, None)), "failed"),
        (Cursor("", FINISHED), None),
    ]:
        assert Cursor.decode(c.encode(), status, 2) == c
    good = Cursor("failed", FINISHED, before=(3, None)).encode()
    with pytest.raises(BadCursor, match="made for status=failed, not completed"):
        Cursor.decode(good, "completed", 2)
    with pytest.raises(BadCursor, match="not a cursor"):
        Cursor.decode(good, "failed", 3)  # another number of ledger shards
    pending = Cursor("", PENDING, after="x").encode()
    assert Cursor.decode(pending, None, 1).after == "x"
    import base64

    def token(doc: str) -> str:
        return base64.urlsafe_b64encode(doc.encode()).decode()

    bad = [
        "",
        "!!",
        "a",
        token("{}"),
        token("[1,2]"),
        token('["","f",[-1,null]]'),
        token('["","f",[true,null]]'),
        token('["","p",5]'),
        token('["","x",""]'),
        token("\xff"),
        "x" * 5000,
        token('["","f",[1.5,null]]'),
        token(f'["","f",[{2**63},null]]'),  # beyond SQLite's integers
        token("[" * 3000),  # nested deeper than the parser goes
    ]
    for b in bad:
        with pytest.raises(BadCursor):
            Cursor.decode(b, None, 2)
