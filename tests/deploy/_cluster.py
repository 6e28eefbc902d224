"""A separate local Ray cluster for tests that need Ray's own CLIs (serve run, ray job).

The session's ``ray_cluster`` fixture is an in-process ``ray.init`` that the other tests
share, so ``ray job submit`` and the ``serve run`` CLI are not run against it. This
starts ``ray start --head`` with its own ``--temp-dir`` and free ports, bound to
loopback (Ray's single-machine mode, as ``fleet.runtime.client.loopback_only`` does),
and stops it by
the PIDs of its own processes (found by that temp dir), never with ``ray stop``, which
would kill every cluster on the machine. Token authentication stays on, with a token
generated for this cluster (``RAY_AUTH_TOKEN_PATH``) that every child process is given.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tests.utils import eventually

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start --head`` on 127.0.0.1 with a private temp dir; ``stop()`` kills by PID."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = True):
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        # Short: Ray's unix socket paths under it must stay below ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="fd-", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self._children: list[subprocess.Popen] = []
        # Token authentication stays on (Ray's default), with a token of our own.
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(generate_new_authentication_token())
        self.token_path.chmod(0o600)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback-only single-machine mode
                "RAY_ADDRESS": self.address,
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_DEDUP_LOGS": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` is this venv's
                "PYTHONPATH": str(REPO),
            }
        )
        return env

    def start(self) -> LocalCluster:
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--temp-dir={self.temp_dir}",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        if self.dashboard:
            cmd += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            cmd += ["--include-dashboard=false"]
        out = subprocess.run(
            cmd,
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
        return self

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        """A child process (its own process group) that ``stop`` kills by PID."""
        p = subprocess.Popen(args, env=self.env, cwd=REPO, start_new_session=True, **kw)
        self._children.append(p)
        return p

    def run(self, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        p = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_tree(p.pid)
            out, err = p.communicate()
            raise AssertionError(
                f"{args} timed out after {timeout_s}s:\n{out}\n{err}"
            ) from None
        return subprocess.CompletedProcess(args, p.returncode, out, err)

    def pids(self) -> list[int]:
        """This cluster's processes: every process whose command line names its temp dir."""
        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                    mine.append(proc.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return mine

    @staticmethod
    def _kill_tree(pid: int) -> None:
        try:
            root = psutil.Process(pid)
            procs = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        for child in self._children:
            self._kill_tree(child.pid)
            child.wait(timeout=10)

        # Workers are children of the raylet; kill the tree of every process that is
        # ours, again for anything that started meanwhile, until none is left.
        def none_left() -> bool:
            pids = self.pids()
            for pid in pids:
                self._kill_tree(pid)
            return not pids

        eventually(none_left, 10, 0.2, what=f"every process of {self.temp_dir} killed")
        shutil.rmtree(self.temp_dir, ignore_errors=True)
