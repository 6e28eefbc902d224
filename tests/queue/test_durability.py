"""kill -9 of the process holding a SQLite-backed queue loses nothing accepted and
brings back nothing acked.

A worker process accepts and works through 100,000 tasks (tests/queue/sqlite_worker.py)
and is SIGKILLed twice mid-run; a fresh process resumes from the file each time and the
last one runs to the end. After each kill the file must hold every accepted task whose
outcome is not recorded, and no acked one. At the end the ledger (the workers' ``K``
lines, recorded once per id) has every task; the only repeats are tasks recorded just
before a kill whose ack had not committed, at most one batch per kill.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.queue.lease_queue import LeaseQueue
from fleet.queue.storage import SqliteStorage
from tests.utils import eventually

ROOT = Path(__file__).resolve().parents[2]
TASKS = 100_000
BATCH = 500


class Transcript:
    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.recorded: set[str] = set()
        self.record_lines: dict[str, int] = {}
        self.acked: set[str] = set()
        self.recovered: list[int] = []
        self.next_first = 0
        self.ended = False
        self.lock = threading.Lock()

    def feed(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        with self.lock:
            if kind == "A":
                first, n = map(int, rest.split())
                self.accepted.update(f"t{first + j}" for j in range(n))
                self.next_first = first + n
            elif kind == "K":
                for i in rest.split():
                    self.recorded.add(i)
                    self.record_lines[i] = self.record_lines.get(i, 0) + 1
            elif kind == "D":
                self.acked.update(rest.split())
            elif kind == "R":
                self.recovered.append(int(rest))
            elif kind == "END":
                self.ended = True


def _run_and_kill(
    db: Path, tr: Transcript, start: int, kill_after: int | None, seed: int
) -> None:
    """Run a worker from ``start``; SIGKILL it once ``kill_after`` tasks are accepted
    (None: let it finish)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.queue.sqlite_worker",
            str(db),
            str(start),
            str(TASKS),
            str(BATCH),
            str(seed),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )

    def pump() -> None:
        buf = b""
        for chunk in iter(lambda: proc.stdout.read(65536), b""):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for ln in lines:
                tr.feed(ln.decode())

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    if kill_after is None:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
        t.join(timeout=30)
        assert tr.ended
        return

    def far_enough() -> bool:
        if proc.poll() is not None:  # it died: stop waiting, show why
            pytest.fail(proc.stderr.read().decode()[-2000:])
        return len(tr.accepted) >= kill_after or tr.ended

    eventually(far_enough, 120, 0.005, what=f"the worker accepting {kill_after} items")
    # Land the kill at an arbitrary point of the worker's put/lease/record/ack cycle.
    time.sleep(random.Random(seed).uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    t.join(timeout=30)  # lines written before the kill are still in the pipe: read them
    assert not tr.ended, "the worker finished before it was killed"


@pytest.mark.timeout(300)
def test_kill_9_loses_nothing_accepted_and_resurrects_nothing_acked(tmp_path):
    db = tmp_path / "shard.sqlite3"
    tr = Transcript()
    checks = []
    for seed, kill_at in ((1, TASKS * 2 // 5), (2, TASKS * 4 // 5)):
        _run_and_kill(db, tr, tr.next_first, kill_at, seed)
        # What a restarted shard sees, right after the kill:
        q = LeaseQueue(10_000_000, storage=SqliteStorage(db))
        pending = set(q.pending_ids())
        q.close()
        with tr.lock:
            assert not pending & tr.acked, "an acked task came back after kill -9"
            lost = tr.accepted - tr.recorded - pending
            assert not lost, f"{len(lost)} accepted tasks lost, e.g. {sorted(lost)[:5]}"
            checks.append((len(tr.accepted), len(pending)))

    _run_and_kill(db, tr, tr.next_first, None, 3)  # resumes and runs to the end
    q = LeaseQueue(10_000_000, storage=SqliteStorage(db))
    assert len(q) == 0 and q.recovered_total == 0
    q.close()
    everything = {f"t{i}" for i in range(TASKS)}
    assert tr.accepted == everything and tr.recorded == everything  # 0 lost
    # Recorded again after a kill (ack not yet committed): absorbed by the ledger's
    # exactly-once recording by id; bounded by one batch per kill.
    repeats = sum(n - 1 for n in tr.record_lines.values())
    assert repeats <= 2 * BATCH
    assert tr.recovered[0] == 0 and all(r > 0 for r in tr.recovered[1:])
    print(
        f"\ndurability: {TASKS} tasks, killed at {checks[0][0]} and {checks[1][0]} "
        f"accepted; recovered {tr.recovered[1:]} after the kills; {repeats} outcomes "
        f"reported again (recorded once by the ledger)"
    )


def test_a_full_disk_refuses_a_put_clearly_and_keeps_what_was_accepted(tmp_path):
    from fleet.queue.storage import StorageFull
    from fleet.task import to_item
    from tests.ledger.test_store import _FullDisk

    path = tmp_path / "work-0.sqlite3"
    storage = SqliteStorage(path)
    q = LeaseQueue(1000, storage=storage)
    first = [to_item({"capability": "w", "payload": i}, {"w"}) for i in range(5)]
    q.put(first)
    disk = _FullDisk(storage._db)
    storage._db = disk  # type: ignore[assignment]
    disk.armed = True
    more = [to_item({"capability": "w", "payload": i}, {"w"}) for i in range(5, 8)]
    with pytest.raises(StorageFull, match=r"storage full: .*work-0.sqlite3: no space"):
        q.put(more)
    assert len(q) == 5, "nothing of a refused put is accepted"
    disk.armed = False
    assert q.put(more) == 3
    storage._db = disk._db
    q.close()
    reopened = LeaseQueue(1000, storage=SqliteStorage(path))
    assert sorted(reopened.pending_ids()) == sorted(it.id for it in first + more)
