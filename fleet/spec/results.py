"""Results section: how long the ledger keeps outcomes, how large one may be, and how
many ledger shards record them."""

from __future__ import annotations

from pydantic import Field

from fleet.spec._base import SpecModel

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_LEDGER_SHARDS = 1
MAX_LEDGER_SHARDS = 64


class ResultsSpec(SpecModel):
    """The ledger: where every task's outcome is recorded, once.

    Outcomes are written to durable storage (the backend of ``queues.storage``: SQLite
    files ``ledger-<i>.sqlite3`` beside the queue files) before a host acknowledges its
    batch. ``retention_s`` (default 7 days) is how long an outcome is kept after the
    task finished: within it, resubmitting the task's id or ``idempotency_key`` returns
    the recorded outcome instead of running it again; after it the outcome is deleted.
    ``max_output_bytes`` bounds one output (JSON-encoded): a larger one fails the task
    with reason ``output_too_large``. ``ledger_shards`` splits the ledger by task id
    over that many actors (one carries well over 10,000 outcomes/s, BENCHMARKS.md).
    """

    retention_s: float = Field(default=DEFAULT_RETENTION_S, gt=0)
    max_output_bytes: int = Field(default=DEFAULT_MAX_OUTPUT_BYTES, ge=1)
    ledger_shards: int = Field(default=DEFAULT_LEDGER_SHARDS, ge=1, le=MAX_LEDGER_SHARDS)
