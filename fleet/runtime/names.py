"""Names of a fleet's actors and Serve apps, so the Ray dashboard shows what is what."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    fleet: str

    @property
    def controller(self) -> str:
        return f"{self.fleet}.controller"

    @property
    def dispatcher(self) -> str:
        return f"{self.fleet}.dispatcher"

    @property
    def budget(self) -> str:
        return f"{self.fleet}.budget"

    @property
    def ledger(self) -> str:
        return f"{self.fleet}.ledger"

    def shard(self, capability: str, index: int) -> str:
        return f"{self.fleet}.queue.{capability}.{index}"

    def kafka_intake(self, index: int) -> str:
        return f"{self.fleet}.kafka_intake.{index}"

    def pool_app(self, pool: str) -> str:
        return f"{self.fleet}-{pool}"

    @staticmethod
    def host_deployment(pool: str) -> str:
        return f"hosts-{pool}"
