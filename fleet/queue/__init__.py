"""Queues: the lease-based queue core (pure) and its ready-order disciplines."""

from fleet.queue.lease_queue import LeaseQueue, QueueFull, QueueStats

__all__ = ["LeaseQueue", "QueueFull", "QueueStats"]
