"""Shared test helpers: a virtual clock, spec builders, a fake ledger client and bounded
polling (``eventually``) for tests that wait on a real system."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fleet.spec import FleetSpec, parse_spec

T = TypeVar("T")


class FakeClock:
    """A clock that only moves when a test says so (``advance``)."""

    def __init__(self, start: float = 1_000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        assert dt >= 0, "time does not run backwards"
        self.t += dt
        return self.t

    async def sleep(self, dt: float) -> None:
        self.advance(dt)


def pool(
    name: str = "noop",
    capability: str | None = None,
    agent_class: str = "fleet.agents.examples:NoopAgent",
    **kw: Any,
) -> dict[str, Any]:
    return {"name": name, "capability": capability or name, "agent_class": agent_class, **kw}


def make_spec(*pools: dict[str, Any], **kw: Any) -> FleetSpec:
    """A spec from pools and top-level sections. Queues keep to memory unless the test
    names a storage: live tests reuse namespaces, and the durable default would carry
    one run's unfinished tasks into the next."""
    queues = dict(kw.pop("queues", {}))
    queues.setdefault("storage", {"backend": "memory"})
    return parse_spec({"pools": list(pools) or [pool()], "queues": queues, **kw})


class FakeLedger:
    """Stands in for the hosts' ``LedgerClient`` in host tests (one shard): the
    outcomes recorded are kept in ``outcomes`` (and the wall time each was recorded in
    ``recorded_at``), the excusals in ``excused``, the record calls in ``calls``."""

    n = 1

    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.recorded_at: dict[str, float] = {}
        self.excused: list[str] = []
        self.calls = 0

    def shard_of(self, task_id: str) -> int:
        return 0

    async def record_shard_async(
        self, shard: int, outcomes: list[Any], excused: list[str] | None = None
    ) -> int:
        self.calls += 1
        self.outcomes.extend(outcomes)
        now = time.time()
        for o in outcomes:
            self.recorded_at.setdefault(o.task_id, now)
        self.excused.extend(excused or ())
        return len(outcomes)


def eventually(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s``
    passes (AssertionError naming ``what`` and the last value or error). For tests that
    wait on a real system (a cluster, a subprocess, a broker): bounded polling, never a
    bare sleep. An exception from ``predicate`` counts as "not yet" (e.g. not reachable
    yet) unless it is not an ``Exception`` (``pytest.fail`` stops the wait at once).
    Inside an event loop, await ``eventually_async`` instead: this one blocks."""
    poll = _Poll(predicate, timeout_s, what)
    while True:
        if poll.done():
            return poll.last
        time.sleep(interval_s)


async def eventually_async(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> T:
    """``eventually`` for a test running in an event loop: it awaits between polls, so
    the tasks the condition depends on keep running."""
    poll = _Poll(predicate, timeout_s, what)
    while True:
        if poll.done():
            return poll.last
        await asyncio.sleep(interval_s)


class _Poll:
    """The one polling rule behind ``eventually`` and ``eventually_async``."""

    def __init__(self, predicate: Callable[[], Any], timeout_s: float, what: str):
        self.predicate = predicate
        self.timeout_s = timeout_s
        self.what = what or getattr(predicate, "__name__", "predicate")
        self.deadline = time.monotonic() + timeout_s
        self.last: Any = None

    def done(self) -> bool:
        """Poll once: True when the predicate holds; raises once the time is up."""
        try:
            self.last = self.predicate()
            if self.last:
                return True
        except Exception as exc:  # e.g. not reachable yet: keep polling, report it
            self.last = exc
        if time.monotonic() >= self.deadline:
            raise AssertionError(
                f"not true after {self.timeout_s:g}s: {self.what}; last: {self.last!r}"
            )
        return False
