"""A set that keeps only its newest members, for "seen recently" checks on hot paths.

Why not an insertion-ordered dict with deletions from the front: CPython leaves a hole
in a dict's entry array for each deleted key until the dict is resized, and finding the
oldest key (``next(iter(d))``) walks those holes, so evicting one key at a time from the
front costs O(holes), thousands of steps per eviction at steady state. A deque of keys
beside a set evicts in O(1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable


class BoundedSet:
    """Membership of the ``limit`` most recently added keys (older ones are forgotten)."""

    __slots__ = ("_members", "_order", "limit")

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._order: deque[Hashable] = deque()
        self._members: set[Hashable] = set()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)

    def update(self, keys: Iterable[Hashable]) -> None:
        members, order = self._members, self._order
        for k in keys:
            if k not in members:
                members.add(k)
                order.append(k)
        while len(order) > self.limit:
            members.discard(order.popleft())

    def clear(self) -> None:
        self._order.clear()
        self._members.clear()
