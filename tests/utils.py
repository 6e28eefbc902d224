"""Shared test helpers: a virtual clock, spec builders and fake load snapshots."""

from __future__ import annotations

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
    passes (AssertionError naming ``what`` and the last value or error). For live tests
    that wait on a real system: bounded polling, never a bare sleep."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # e.g. not reachable yet: keep polling, report it
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"not true after {timeout_s:g}s: "
                f"{what or getattr(predicate, '__name__', 'predicate')}; "
                f"last: {last!r}"
            )
        time.sleep(interval_s)
