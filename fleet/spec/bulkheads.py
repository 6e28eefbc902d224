"""Bulkheads: limits on queued and in-flight tasks, per pool and per tenant, so one
pool's or one tenant's flood cannot take another's queue room or agents.

- ``pools.<pool>``: ``max_queued`` bounds the pool's queue (all its shards; the
  tighter of it and ``queues.max_depth`` per shard), ``max_in_flight`` the tasks the
  dispatcher runs at once in the pool, whatever its agents could take.
- ``tenant``: every tenant's limits in each pool it sends to; ``tenants.<name>``
  replaces them for one tenant (a limit it leaves unset is no limit for it). A task's
  tenant is the one its id names (the HTTP ingress scopes every id by the caller's
  key; ``FleetClient.submit(tenant=...)``); tasks with no tenant (a trusted Python
  client's own) are bound by the pool's limits only.

A queue is sharded, and each shard enforces its share of a limit on its own (``limit //
shards``, the remainder to the first shards): exact, and no call per task to anything
shared, at the price that a tenant whose tasks are unevenly spread over the shards
reaches a shard's share before the whole limit. So a limit is at least
``queues.shards``. The rule is ``fleet.policy.bulkhead``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from fleet.security.keys import check_tenant
from fleet.spec._base import SpecModel

DEFAULT_BULKHEAD_RETRY_AFTER_S = 1.0


class BulkheadLimits(SpecModel):
    """``max_queued``: tasks waiting or running (what the queue holds); ``max_in_flight``:
    tasks handed to agents at once. None: no limit."""

    max_queued: int | None = Field(default=None, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1)

    def below(self, shards: int) -> list[tuple[str, int]]:
        """The limits set below ``shards`` (each shard needs a share of at least one)."""
        return [
            (name, v)
            for name in ("max_queued", "max_in_flight")
            if (v := getattr(self, name)) is not None and v < shards
        ]


class BulkheadsSpec(SpecModel):
    """Per-pool and per-tenant limits; ``retry_after_s``: what a task refused at its
    tenant's ``max_queued`` is told to wait before it is sent again."""

    pools: dict[str, BulkheadLimits] = Field(default_factory=dict)
    tenant: BulkheadLimits = BulkheadLimits()
    tenants: dict[str, BulkheadLimits] = Field(default_factory=dict)
    retry_after_s: float = Field(
        default=DEFAULT_BULKHEAD_RETRY_AFTER_S, gt=0, le=3_600, allow_inf_nan=False
    )

    @property
    def configured(self) -> bool:
        """Whether any limit is set."""
        limits = [*self.pools.values(), self.tenant, *self.tenants.values()]
        return any(
            v is not None for lim in limits for v in (lim.max_queued, lim.max_in_flight)
        )

    @field_validator("tenants")
    @classmethod
    def _check_tenant_names(cls, v: dict[str, BulkheadLimits]) -> dict[str, BulkheadLimits]:
        for name in v:
            check_tenant(name)
        return v
