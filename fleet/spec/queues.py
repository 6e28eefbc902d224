"""Queue section: bounds, leases, sharding, payload limits and dispatcher batching."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, model_validator

from fleet.spec._base import SpecModel

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_LEASE_S = 60.0


class Discipline(str, Enum):
    FIFO = "fifo"
    PRIORITY = "priority"


class BatchSpec(SpecModel):
    """Adaptive dispatcher batching: single items when the queue is shallow, up to
    ``max_items``/``max_bytes`` per call when it is deep.

    ``target_batches_in_flight`` splits the visible depth into that many batches. The
    default of 1 leases all that is visible (within capacity and the bounds): measured,
    splitting a shallow queue into smaller calls made per-call overhead the bottleneck
    and raised p95 at 80% load from 1.7 s to 9.6 s (BENCHMARKS.md). Raise it to spread
    a deep queue over more concurrent calls."""

    max_items: int = Field(default=256, ge=1)
    max_bytes: int = Field(default=1024 * 1024, ge=1)
    target_batches_in_flight: int = Field(default=1, ge=1)


class QueueSpec(SpecModel):
    """Per-capability work queues. Each capability gets ``shards`` queue actors."""

    discipline: Discipline = Discipline.FIFO
    shards: int = Field(default=2, ge=1)
    max_depth: int = Field(default=1_000_000, ge=1)
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)
    submit_timeout_s: float = Field(default=10.0, ge=0)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1)
    batch: BatchSpec = BatchSpec()

    @model_validator(mode="after")
    def _check_batch(self) -> QueueSpec:
        if self.batch.max_bytes < self.max_payload_bytes:
            raise ValueError(
                f"batch.max_bytes ({self.batch.max_bytes}) must be >= max_payload_bytes "
                f"({self.max_payload_bytes}) so that the largest task fits in one batch"
            )
        return self
