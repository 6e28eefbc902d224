"""Per-tenant request rates shared by every ingress replica.

``RateLimiter`` is one named actor per fleet (``Names.ratelimit``) holding a token
bucket per tenant (``fleet.policy.ratelimit.TenantBuckets``). Each ingress replica keeps
a few tokens per tenant (``LeasedTokens``), asks the actor for more only when they run
out, and drops what it did not use within ``HOLD_S``: a replica only spends tokens the
shared bucket granted, so the tenants' limits hold across all replicas together, and
the actor is asked about once per ``CHUNK_SHARE`` of a tenant's rate, not once per
request.

Any process can die: the buckets are in memory only. A restarted limiter starts every
bucket full, which forgives at most one burst per tenant; nothing accepted depends on
it. While the limiter cannot be reached, replicas refuse with 503 (failing closed: an
outage of the limiter must not lift the limits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import ray

from fleet.policy.ratelimit import TenantBuckets

CHUNK_SHARE = 0.1  # a replica asks for a tenth of a second's worth of tokens at a time
HOLD_S = 1.0  # tokens a replica holds longer than this are dropped unused
ASK_TIMEOUT_S = 2.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RateLimiter:
    """The fleet's tenant buckets (see the module docstring)."""

    def __init__(self, rate_per_s: float, burst: int):
        self._buckets = TenantBuckets(rate_per_s, burst, time.monotonic)

    async def take(self, tenant: str, n: int) -> tuple[int, float]:
        return self._buckets.take(tenant, n)


@dataclass(slots=True)
class _Held:
    tokens: int
    until: float


class LimiterUnavailable(RuntimeError):
    """The shared limiter did not answer."""


class LeasedTokens:
    """One replica's side: ``await acquire(tenant)`` -> (True, 0) or (False, wait_s)."""

    def __init__(self, actor: Any, rate_per_s: float, burst: int, clock: Any = time.monotonic):
        self._actor = actor
        self._chunk = max(1, min(burst, math.ceil(rate_per_s * CHUNK_SHARE)))
        self._clock = clock
        self._held: dict[str, _Held] = {}

    async def acquire(self, tenant: str) -> tuple[bool, float]:
        now = self._clock()
        h = self._held.get(tenant)
        if h is not None and h.tokens > 0 and now < h.until:
            h.tokens -= 1
            return True, 0.0
        try:
            got, wait_s = await self._actor.take.remote(tenant, self._chunk)
        except Exception as exc:  # the limiter is restarting or gone
            raise LimiterUnavailable(f"rate limiter: {type(exc).__name__}") from exc
        if got <= 0:
            return False, wait_s
        self._held[tenant] = _Held(got - 1, self._clock() + HOLD_S)
        if len(self._held) > 10_000:  # forget tenants that hold nothing
            self._held = {t: x for t, x in self._held.items() if x.tokens > 0}
        return True, 0.0


def limiter_actor(fleet: str, namespace: str, rate_per_s: float, burst: int) -> Any:
    """The fleet's limiter, started by the first replica that asks (detached: it
    outlives replicas; ``teardown`` removes it)."""
    from fleet.runtime.names import Names

    return RateLimiter.options(  # type: ignore[attr-defined]
        name=Names(fleet).ratelimit,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
    ).remote(rate_per_s, burst)
