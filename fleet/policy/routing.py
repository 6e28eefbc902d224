"""Routers: pick the candidate (agent or host) that gets the next piece of work.

Pure and transport-free: a router sees ``Candidate`` load snapshots and an injected
``random.Random``. The Serve request router, the tests (with fake candidates) and the
simulator call the same objects.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fleet.spec.routing import RouterName, RoutingSpec


@dataclass(slots=True)
class Candidate:
    """A load snapshot. ``capacity`` is how many tasks it may hold at once."""

    id: str
    in_flight: int
    capacity: int
    latency_s: float = 0.0

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight

    @property
    def load(self) -> float:
        return self.in_flight / self.capacity if self.capacity > 0 else float("inf")


class Router(Protocol):
    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int | None:
        """Index of the chosen candidate, or None when every candidate is full."""


def _key(c: Candidate) -> tuple[float, float]:
    # Lowest relative load first; on a tie, the one that has been answering faster.
    return (c.load, c.latency_s)


class FullScanRouter:
    """Least loaded over every candidate: exact, O(n)."""

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int | None:
        best, best_key = None, None
        for i, c in enumerate(candidates):
            if c.free <= 0:
                continue
            k = _key(c)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best


class LeastLoadedRouter:
    """Power of d choices: sample d candidates, take the least loaded.

    Sampling d >= 2 instead of scanning keeps the choice O(d) while, by the
    supermarket-model result, the maximum queue length falls from log n / log log n
    (random) to log log n / log d. If every sampled candidate is full we fall back to
    a full scan, so a free candidate is never missed.
    """

    def __init__(self, d: int = 2):
        if d < 1:
            raise ValueError(f"choices_d must be >= 1, got {d}")
        self.d = d
        self._scan = FullScanRouter()

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int | None:
        n = len(candidates)
        if n == 0:
            return None
        picks = range(n) if n <= self.d else rng.sample(range(n), self.d)
        best, best_key = None, None
        for i in picks:
            c = candidates[i]
            if c.free <= 0:
                continue
            k = _key(c)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best if best is not None else self._scan.choose(candidates, rng)


class RoundRobinRouter:
    """Next candidate in turn, skipping full ones."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int | None:
        n = len(candidates)
        for k in range(n):
            i = (self._next + k) % n
            if candidates[i].free > 0:
                self._next = i + 1
                return i
        return None


class RandomRouter:
    """Uniformly random among candidates with room."""

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int | None:
        free = [i for i, c in enumerate(candidates) if c.free > 0]
        return rng.choice(free) if free else None


def make_router(spec: RoutingSpec) -> Router:
    """The router a pool's spec names."""
    if spec.router is RouterName.LEAST_LOADED:
        return LeastLoadedRouter(spec.choices_d)
    if spec.router is RouterName.FULL_SCAN:
        return FullScanRouter()
    if spec.router is RouterName.ROUND_ROBIN:
        return RoundRobinRouter()
    if spec.router is RouterName.RANDOM:
        return RandomRouter()
    raise ValueError(f"unknown router {spec.router!r}")
