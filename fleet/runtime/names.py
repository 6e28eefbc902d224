"""Names of a fleet's actors and Serve apps, so the Ray dashboard shows what is what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.spec.fleet import FleetSpec


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
    def ratelimit(self) -> str:
        """The tenants' shared request buckets (made by the first ingress replica)."""
        return f"{self.fleet}.ratelimit"

    @property
    def ledger(self) -> str:
        """The first ledger shard's name (``ledger_shard(0)``)."""
        return self.ledger_shard(0)

    def ledger_shard(self, index: int) -> str:
        return f"{self.fleet}.ledger" if index == 0 else f"{self.fleet}.ledger.{index}"

    def shard(self, capability: str, index: int) -> str:
        return f"{self.fleet}.queue.{capability}.{index}"

    def kafka_intake(self, index: int) -> str:
        return f"{self.fleet}.kafka_intake.{index}"

    def pool_app(self, pool: str) -> str:
        return f"{self.fleet}-{pool}"

    def control_actors(self, spec: FleetSpec) -> list[str]:
        """Every stateful actor of ``spec``'s fleet, in the order deploy starts them."""
        kafka = spec.queues.kafka
        return [
            *(self.ledger_shard(i) for i in range(spec.results.ledger_shards)),
            *([self.budget] if spec.budgets.enforced else []),
            *(
                self.shard(cap, i)
                for cap in spec.capabilities
                for i in range(spec.queues.shards)
            ),
            self.controller,
            self.dispatcher,
            *(self.kafka_intake(i) for i in range(kafka.consumers if kafka else 0)),
        ]

    @staticmethod
    def host_deployment(pool: str) -> str:
        return f"hosts-{pool}"
