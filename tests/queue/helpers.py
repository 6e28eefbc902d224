"""Item builders for the queue tests."""

from __future__ import annotations

from fleet.task import Item


def item(
    i: int | str,
    t: float = 1_000.0,
    priority: int = 5,
    deadline: float | None = None,
    utility: float | None = None,
    payload: bytes = b"{}",
) -> Item:
    return Item(
        id=str(i),
        capability="work",
        priority=priority,
        payload=payload,
        submitted_unix_s=t,
        deadline_unix_s=deadline,
        utility=utility,
    )
