"""Token buckets: a rate with a burst, per tenant. Pure; the clock is injected.

A bucket holds at most ``burst`` tokens and gains ``rate_per_s`` per second; a request
takes one. ``take(n)`` grants up to ``n`` at once, which lets a caller that serves many
requests (an ingress replica) hold a few tokens locally and ask the shared bucket only
now and then: tokens are only ever spent after the shared bucket granted them, so the
rate holds across all callers together.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate_per_s`` tokens per second, at most ``burst`` held."""

    __slots__ = ("burst", "rate_per_s", "t", "tokens")

    def __init__(self, rate_per_s: float, burst: int, now: float):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"rate_per_s ({rate_per_s}) must be > 0 and burst ({burst}) >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.t = now

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate_per_s)
            self.t = now

    def take(self, n: int, now: float) -> int:
        """Grant up to ``n`` whole tokens now (0 when empty)."""
        self._refill(now)
        got = min(n, math.floor(self.tokens))
        self.tokens -= got
        return got

    def wait_s(self, now: float) -> float:
        """Seconds until one whole token is there (0 if one is)."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)


class TenantBuckets:
    """One bucket per tenant, made on first use; at most ``max_tenants`` kept (the
    least recently used go first: a bucket that is dropped is full again next time,
    so dropping one can only forgive, and only a tenant idle longest)."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Clock, max_tenants: int = 100_000
    ):
        TokenBucket(rate_per_s, burst, 0.0)  # validates the pair
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._max = max_tenants
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, tenant: str, now: float) -> TokenBucket:
        b = self._buckets.get(tenant)
        if b is None:
            b = self._buckets[tenant] = TokenBucket(self.rate_per_s, self.burst, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(tenant)
        return b

    def take(self, tenant: str, n: int) -> tuple[int, float]:
        """Grant up to ``n`` tokens to ``tenant``: (granted, seconds until the next
        token when none was granted, else 0)."""
        now = self._clock()
        b = self._bucket(tenant, now)
        got = b.take(n, now)
        return got, (0.0 if got else b.wait_s(now))
