"""Adaptive dispatch batching: how many queued items to send in one call."""

from __future__ import annotations

import math

from fleet.spec.queues import BatchSpec


def batch_size(spec: BatchSpec, depth: int, free_capacity: int, avg_item_bytes: float) -> int:
    """Items to lease for the next call to a pool.

    A deep queue is split into ``target_batches_in_flight`` large batches (amortizing
    the per-call overhead); a shallow one goes out an item at a time (no item waits for
    a batch to fill). Never more than ``free_capacity``, ``max_items``, or what fits in
    ``max_bytes``. A batch runs on one host, so ``free_capacity`` is at most one host's
    free slots: the simulator passes the chosen host's, the runtime's dispatcher the
    pool's free slots capped at one host's share. Returns 0 when there is nothing to
    send or no room.
    """
    if depth <= 0 or free_capacity <= 0:
        return 0
    by_bytes = max(1, int(spec.max_bytes // max(avg_item_bytes, 1.0)))
    n = math.ceil(depth / spec.target_batches_in_flight)
    return max(1, min(n, depth, free_capacity, spec.max_items, by_bytes))
