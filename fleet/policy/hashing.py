"""The stable hash: the same value for the same text in every process and every run.

Python's ``hash(str)`` is salted per process, so anything that must agree across
processes, restarts or replays (which agent owns an affinity key, a question's key, a
seeded tie-break, which tasks an example agent fails) hashes with ``stable_hash64``.

Not for values that are stored or travel between versions: those keep their own,
documented function (``fleet.task.payload_hash``, ``fleet.ledger.store.key_hash``, and
the CRC-32 shard rule in ``fleet.policy.sharding.shard_of``), which must never change.
"""

from __future__ import annotations

import hashlib

PART_SEP = "\x1f"  # ASCII unit separator between the parts of a composite key
STABLE_HASH_SPAN = 2**64  # stable_hash64 is in [0, STABLE_HASH_SPAN)


def stable_hash64(*parts: object) -> int:
    """A 64-bit hash of ``parts`` (joined by ``PART_SEP`` as text), the same in every
    process and run: BLAKE2b with an 8-byte digest, read big-endian.

    ``stable_hash64(x) / STABLE_HASH_SPAN`` is a uniform-looking number in [0, 1).
    """
    text = (
        parts[0]
        if len(parts) == 1 and type(parts[0]) is str
        else PART_SEP.join(map(str, parts))
    )
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


__all__ = ["PART_SEP", "STABLE_HASH_SPAN", "stable_hash64"]
