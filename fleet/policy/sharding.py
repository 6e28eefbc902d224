"""Sharding: which queue and shard a task goes to, which shards a consumer reads, and
how evenly the shards are loaded.

Pure: hashing is stable across processes and runs (BLAKE2b, never Python's salted
``hash``), randomness comes in as a ``random.Random``.

Layout: one queue per capability, optionally per region (``queue_id``), each split into
``shards`` shard actors. A task with a key (its affinity key) always lands on the same
shard of its queue (jump consistent hash: growing from n to n+1 shards moves only about
1/(n+1) of the keys); a task without one goes to the shallower of two random shards.
Consumers start their sweep at a shard derived from their own id, so many consumers
spread over the shards instead of all contending on shard 0.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

_REGION_SEP = "@"


def stable_hash64(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and every run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach 2014): a bucket in [0, buckets).

    When ``buckets`` grows by one, a key either stays or moves to the new bucket, and
    each key moves with probability 1/buckets: the minimum possible reshuffle.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    key &= (1 << 64) - 1
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & ((1 << 64) - 1)
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def queue_id(capability: str, region: str | None = None) -> str:
    """The queue a capability (in a region) uses: ``support`` or ``support@eu-west``."""
    if not capability:
        raise ValueError("capability must be non-empty")
    if _REGION_SEP in capability:
        raise ValueError(f"capability {capability!r} must not contain {_REGION_SEP!r}")
    return capability if not region else f"{capability}{_REGION_SEP}{region}"


def shard_for_key(queue: str, key: str, shards: int) -> int:
    """The shard of ``queue`` that owns ``key``: stable, minimal movement on resize."""
    return jump_hash(stable_hash64(f"{queue}\x00{key}"), shards)


def pick_shard(
    shards: int,
    rng: random.Random,
    depths: Sequence[int] | None = None,
    key: str | None = None,
    queue: str = "",
) -> int:
    """The shard a submitted task goes to.

    With a ``key``: ``shard_for_key`` (same key, same shard). Without: the shallower of
    two random shards when ``depths`` are known (power of two choices keeps the maximum
    depth within O(log log n) of the mean), else a random shard.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if key is not None:
        return shard_for_key(queue, key, shards)
    if shards == 1:
        return 0
    a = rng.randrange(shards)
    if depths is None:
        return a
    if len(depths) != shards:
        raise ValueError(f"depths has {len(depths)} entries for {shards} shards")
    b = rng.randrange(shards - 1)
    b = b + 1 if b >= a else b  # a distinct second choice
    return a if depths[a] <= depths[b] else b


def consumer_shard_order(consumer_id: str, shards: int) -> list[int]:
    """The order in which a consumer sweeps the shards: a rotation starting at a
    shard derived from its id, so consumers start on different shards."""
    start = stable_hash64(consumer_id) % shards if shards else 0
    return [(start + k) % shards for k in range(shards)]


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


__all__ = [
    "ShardBalance",
    "consumer_shard_order",
    "jump_hash",
    "pick_shard",
    "queue_id",
    "shard_balance",
    "shard_for_key",
    "stable_hash64",
]
