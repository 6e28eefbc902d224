"""Sharding: which shard a task id belongs to, and how evenly shards are loaded.

``shard_of`` is the one placement rule for everything keyed by task id: a capability's
queue shard (``FleetClient.submit``, the HTTP ingress, Kafka intake) and the ledger
shard holding its outcome (``LedgerClient``). Every entry point must agree, so that a
resubmitted id lands where the first copy is (which then ignores the duplicate), and
the rule must never change: durable queue and ledger files were filled by it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass


def shard_of(key: str, shards: int) -> int:
    """The shard in ``[0, shards)`` of ``key`` (a task id): ``crc32(key) % shards``.

    CRC-32 rather than ``fleet.policy.hashing.stable_hash64``: shard files written by
    earlier versions depend on this exact rule, and it is the cheapest stable hash.
    """
    if shards < 2:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        return 0
    return zlib.crc32(key.encode()) % shards


@dataclass(frozen=True, slots=True)
class ShardBalance:
    """How evenly items are spread over shards. A perfectly balanced queue has
    ``max_over_mean == 1`` and ``cv == 0``; both are 0 when the queue is empty."""

    shards: int
    total: int
    mean: float
    max: int
    min: int
    max_over_mean: float
    cv: float  # coefficient of variation: population std / mean


def shard_balance(depths: Sequence[int]) -> ShardBalance:
    """Balance of a queue's shards from their depths (or any per-shard count)."""
    if not depths:
        return ShardBalance(0, 0, 0.0, 0, 0, 0.0, 0.0)
    n = len(depths)
    total = sum(depths)
    mean = total / n
    if mean == 0:
        return ShardBalance(n, 0, 0.0, max(depths), min(depths), 0.0, 0.0)
    var = sum((d - mean) ** 2 for d in depths) / n
    return ShardBalance(
        n, total, mean, max(depths), min(depths), max(depths) / mean, math.sqrt(var) / mean
    )


__all__ = ["ShardBalance", "shard_balance", "shard_of"]
