"""Shared test helpers: a virtual clock, spec builders and fake load snapshots."""

from __future__ import annotations

from typing import Any

from fleet.spec import FleetSpec, parse_spec


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


def pool(name: str = "noop", capability: str | None = None,
         agent_class: str = "fleet.agents.examples:NoopAgent", **kw: Any) -> dict[str, Any]:
    return {"name": name, "capability": capability or name, "agent_class": agent_class, **kw}


def make_spec(*pools: dict[str, Any], **kw: Any) -> FleetSpec:
    """A spec from pools and top-level sections. Queues keep to memory unless the test
    names a storage: live tests reuse namespaces, and the durable default would carry
    one run's unfinished tasks into the next."""
    queues = dict(kw.pop("queues", {}))
    queues.setdefault("storage", {"backend": "memory"})
    return parse_spec({"pools": list(pools) or [pool()], "queues": queues, **kw})


class FakeLedger:
    """Stands in for the ledger actor in host tests: ``record.remote(outcomes)`` keeps
    the outcomes in ``outcomes``."""

    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.record = self

    async def remote(self, outcomes: list[Any]) -> int:
        self.outcomes.extend(outcomes)
        return len(outcomes)
