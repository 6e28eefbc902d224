"""Queues: the lease-based queue core (pure), its storage backends and its monitoring.

Also here, imported by module path: ``fleet.queue.kafka_intake`` (Kafka consumer-group
intake). The queues' metrics are the controller's (``fleet.runtime.control_metrics``).
Disciplines, sharding and alert rules are pure policies in ``fleet.policy``.
"""

from fleet.queue.lease_queue import LeaseQueue, QueueFull, QueueStats
from fleet.queue.monitor import QueueHealth, QueueMonitor, ShardHealth
from fleet.queue.storage import (
    MemoryStorage,
    QueueStorage,
    SqliteStorage,
    make_storage,
    shard_path,
)

__all__ = [
    "LeaseQueue",
    "MemoryStorage",
    "QueueFull",
    "QueueHealth",
    "QueueMonitor",
    "QueueStats",
    "QueueStorage",
    "ShardHealth",
    "SqliteStorage",
    "make_storage",
    "shard_path",
]
