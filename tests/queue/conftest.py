"""Queue test fixtures: storage backends (parametrized) and a real Tansu Kafka broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet.queue.storage import MemoryStorage, SqliteStorage
from fleet.queue.tansu import tansu_broker


@pytest.fixture(params=["memory", "sqlite"])
def storage_factory(request, tmp_path):
    """Make the storage of one shard; calling it again reopens the same store, as a
    restarted shard would (the memory backend hands back the same object)."""
    if request.param == "memory":
        shared = MemoryStorage()
        return lambda: shared
    path = tmp_path / "shard.sqlite3"
    return lambda: SqliteStorage(path)


class Broker:
    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory) -> Iterator[Broker]:
    """A Tansu broker (memory storage) on a free loopback port, for this module
    (``fleet.queue.tansu``, the one the benchmarks use)."""
    with tansu_broker(tmp_path_factory.mktemp("tansu")) as (bootstrap, why):
        if bootstrap is None:
            pytest.fail(why)
        yield Broker(bootstrap)
