"""Client-side adaptive throttling: send less while the server refuses. Pure.

The rule is the one in Google's SRE book ("Handling Overload", client-side
throttling): over a sliding window, a client that made ``requests`` and had
``accepts`` of them accepted holds back a share

    max(0, (requests - k * accepts) / (requests + 1))

of what it would send. With ``k = 2`` a server that accepts half of what is asked is
asked about as much as it accepts, twice over; as refusals stop, ``accepts`` catches up
and the share falls back to 0. The client spends its own time holding work back
instead of the server's time refusing it.

``fleet submit --retry-refused-s`` and ``FleetClient.submit_until_accepted`` use it for
what admission control refused (``shed`` or ``unavailable``; ``deadline_exceeded`` is
not retried); it is written to serve any client of a server that refuses under load
(a model API's rate limits too). Clock injected: counts are kept per second in a ring
of ``window_s`` buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

DEFAULT_K = 2.0
DEFAULT_WINDOW_S = 60


class ClientThrottle:
    """Requests and accepts over the last ``window_s`` seconds of ``clock``."""

    def __init__(
        self,
        clock: Callable[[], float],
        k: float = DEFAULT_K,
        window_s: int = DEFAULT_WINDOW_S,
    ):
        if not k >= 1:
            raise ValueError(f"k: {k} must be >= 1 (k < 1 would hold back accepted work)")
        if window_s < 1:
            raise ValueError(f"window_s: {window_s} must be a whole number of seconds >= 1")
        self._clock = clock
        self.k = k
        self._n = int(window_s)
        self._requests = [0] * self._n
        self._accepts = [0] * self._n
        self._second = [-1] * self._n  # which second each bucket counts

    def _bucket(self) -> int:
        now = math.floor(self._clock())
        b = now % self._n
        if self._second[b] != now:
            self._second[b] = now
            self._requests[b] = self._accepts[b] = 0
        return b

    def record(self, requests: int, accepts: int) -> None:
        """``requests`` made now, of which ``accepts`` were accepted."""
        if not 0 <= accepts <= requests:
            raise ValueError(f"accepts {accepts} must be within [0, requests {requests}]")
        b = self._bucket()
        self._requests[b] += requests
        self._accepts[b] += accepts

    def _totals(self) -> tuple[int, int]:
        now = math.floor(self._clock())
        live = [b for b in range(self._n) if now - self._second[b] < self._n]
        return sum(self._requests[b] for b in live), sum(self._accepts[b] for b in live)

    def hold_share(self) -> float:
        """The share of new requests to hold back now, in [0, 1)."""
        requests, accepts = self._totals()
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def allowed(self, n: int) -> int:
        """How many of ``n`` requests to send now (at least one while any is waiting,
        so the client always learns when the server takes work again)."""
        if n <= 0:
            return 0
        return max(1, math.floor(n * (1.0 - self.hold_share())))
