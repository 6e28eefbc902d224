"""Put validated items into a fleet's queue shards: the path every intake takes.

``FleetClient.submit_items`` and the Kafka intake actors both enqueue through
``put_items``, so an id always lands on the same shard whichever way it came in.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import ray

from fleet.policy.backoff import attempt_state, backoff_wait
from fleet.policy.sharding import shard_of
from fleet.queue.lease_queue import QueueFull
from fleet.spec.backoff import BackoffSpec
from fleet.task import Item

SUBMIT_CHUNK = 2_000
# A full shard is asked again after fleet's one backoff rule (no jitter: the waits of
# one caller's chunks are already spread by their shards).
PUT_BACKOFF = BackoffSpec(initial_backoff_s=0.01, max_backoff_s=0.5, jitter_ratio=0.0)


class QueueFullError(RuntimeError):
    """Submission waited ``submit_timeout_s`` and the queue still had no room."""


def put_items(shards: dict[str, list[Any]], items: list[Item], timeout_s: float) -> list[Item]:
    """Put validated items into their capability's queue shards (``shards``: handles by
    capability, in shard order), in chunks; the path every intake takes. Returns the
    items refused because their tenant holds its queued share (``bulkheads``): nothing
    of them was queued.

    A full shard is retried with backoff up to ``timeout_s``, then QueueFullError names
    what was accepted. Chunks already accepted stay accepted (a retry of the same ids is
    ignored by the shard holding them).
    """
    groups: dict[tuple[str, int], list[Item]] = defaultdict(list)
    for it in items:
        groups[(it.capability, shard_of(it.id, len(shards[it.capability])))].append(it)
    pending = [
        (key, chunk[i : i + SUBMIT_CHUNK])
        for key, chunk in groups.items()
        for i in range(0, len(chunk), SUBMIT_CHUNK)
    ]
    deadline = time.monotonic() + timeout_s
    wait = backoff_wait(PUT_BACKOFF, None)
    tries = 0
    accepted = 0
    refused: list[Item] = []
    while pending:
        # Latency counts from the moment fleet is handed a task, not from validation.
        now = time.time()
        pending = [
            (key, [it._replace(submitted_unix_s=now) for it in chunk])
            for key, chunk in pending
        ]
        refs = [shards[cap][s].put_within.remote(chunk) for (cap, s), chunk in pending]
        retry = []
        for ref, entry in zip(refs, pending):
            try:
                out = set(ray.get(ref))
                refused += [it for it in entry[1] if it.id in out]
                accepted += len(entry[1]) - len(out)
            except QueueFull:
                retry.append(entry)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, QueueFull):
                    retry.append(entry)
                else:
                    raise
        pending = retry
        if pending:
            if time.monotonic() >= deadline:
                left = sum(len(c) for _, c in pending)
                raise QueueFullError(
                    f"queue full: {left} task(s) not accepted after {timeout_s:.1f}s "
                    f"({accepted} accepted); retry later"
                )
            tries += 1
            time.sleep(wait(attempt_state(tries)))
    return refused
