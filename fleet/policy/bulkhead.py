"""Bulkheads (``bulkheads:`` in the spec, ``fleet.spec.bulkheads``): one queue shard's
share of its pool's and its tenants' limits. Pure.

A queue shard enforces its share on its own, so a limit costs no call to anything
shared: ``LeaseQueue`` refuses a tenant's new task once the tenant holds its share of
queued tasks in the shard, and holds back (does not lease) a tenant's ready tasks while
it has its share in flight there. The shares of a limit add up to the limit, so the
limit holds across the pool; the price is that a tenant whose tasks happen to sit in
one shard reaches that shard's share first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.spec.bulkheads import BulkheadLimits, BulkheadsSpec
from fleet.task import MAX_PRIORITY

BULKHEAD = "bulkhead"  # the reason a task refused at its tenant's max_queued is given


def shard_share(limit: int | None, shards: int, index: int) -> int | None:
    """Shard ``index``'s share of ``limit`` over ``shards`` shards: ``limit // shards``,
    one more for the first ``limit % shards`` shards, so the shares add up to
    ``limit``. None (no limit) stays None."""
    if limit is None:
        return None
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} is not in 0..{shards - 1}")
    return limit // shards + (1 if index < limit % shards else 0)


def _share(lim: BulkheadLimits, shards: int, index: int) -> tuple[int | None, int | None]:
    return (
        shard_share(lim.max_queued, shards, index),
        shard_share(lim.max_in_flight, shards, index),
    )


@dataclass(frozen=True)
class ShardBulkhead:
    """The limits one shard of one pool's queue enforces. ``max_queued``: the pool's
    share (the shard's depth bound, with ``queues.max_depth``); ``tenant``: every
    tenant's (queued, in flight) share; ``tenants``: the shares of tenants with their
    own limits. None: no limit."""

    max_queued: int | None = None
    tenant: tuple[int | None, int | None] = (None, None)
    tenants: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: BulkheadsSpec, pool: str, shards: int, index: int) -> ShardBulkhead:
        own = spec.pools.get(pool, BulkheadLimits())
        return cls(
            max_queued=shard_share(own.max_queued, shards, index),
            tenant=_share(spec.tenant, shards, index),
            tenants={t: _share(lim, shards, index) for t, lim in spec.tenants.items()},
        )

    @property
    def limits_tenants(self) -> bool:
        """Whether any tenant is limited here (the shard then counts per tenant)."""
        return any(v is not None for lim in (self.tenant, *self.tenants.values()) for v in lim)

    def queued_limit(self, tenant: str) -> int | None:
        return self.tenants.get(tenant, self.tenant)[0]

    def in_flight_limit(self, tenant: str) -> int | None:
        return self.tenants.get(tenant, self.tenant)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "max_queued": self.max_queued,
            "tenant": list(self.tenant),
            "tenants": {t: list(v) for t, v in self.tenants.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardBulkhead:
        return cls(
            max_queued=d.get("max_queued"),
            tenant=tuple(d.get("tenant", (None, None))),
            tenants={t: tuple(v) for t, v in d.get("tenants", {}).items()},
        )


def held_back(
    ready: Mapping[str, Sequence[int]],
    leased: Mapping[str, int],
    in_flight_limit: Callable[[str], int | None],
) -> list[int]:
    """By priority, the ready tasks their tenants' in-flight limits keep from running
    now. ``ready``: per tenant with an in-flight limit, its ready (queued, not leased)
    tasks by priority 0..9; ``leased``: per tenant, its tasks in flight. Of a tenant's
    ready tasks, all but what its free room can take, highest priorities first (the
    order they would go in). Not work ahead of other tenants' tasks: admission control
    and the autoscaler leave it out. The queue shard and the simulator both count it so."""
    out = [0] * (MAX_PRIORITY + 1)
    for t, by_p in ready.items():
        room = (in_flight_limit(t) or 0) - leased.get(t, 0)
        for p in range(MAX_PRIORITY, -1, -1):
            runs = min(by_p[p], max(room, 0))
            room -= runs
            out[p] += by_p[p] - runs
    return out


def pool_max_in_flight(spec: BulkheadsSpec, pool: str) -> int | None:
    """The tasks the dispatcher may have in flight in ``pool`` at once (None: as many
    as its agents take)."""
    lim = spec.pools.get(pool)
    return None if lim is None else lim.max_in_flight
