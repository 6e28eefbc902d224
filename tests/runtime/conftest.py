"""Runtime test fixtures: the Kafka broker of the queue tests, for live kill tests."""

from tests.queue.conftest import kafka_broker  # noqa: F401  (a fixture, used by name)
