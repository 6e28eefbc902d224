"""A process that owns a SQLite-backed queue and works through it, for the kill -9 test.

Each round it accepts a batch of new tasks, leases a batch, "runs" them and records the
outcomes in the ledger before acking, as the runtime does. It reports on stdout, each
line flushed before the next step:

    R <n>         recovered n items from storage at start
    A <first> <n> accepted ids t<first> .. t<first+n-1> (put returned: committed)
    K <ids...>    outcomes recorded in the ledger (not yet acked)
    D <ids...>    acked (ack returned: committed)

Run: python -m tests.queue.sqlite_worker DB START STOP BATCH SEED
"""

from __future__ import annotations

import random
import sys
import time

from fleet.queue.lease_queue import LeaseQueue
from fleet.queue.storage import SqliteStorage
from fleet.task import Item


def main() -> int:
    db, start, stop, batch, seed = sys.argv[1], *map(int, sys.argv[2:6])
    rng = random.Random(seed)
    out = sys.stdout
    q = LeaseQueue(10_000_000, max_deliveries=3, storage=SqliteStorage(db))
    out.write(f"R {q.recovered_total}\n")
    out.flush()
    first = start
    while first < stop or len(q):
        if first < stop:
            n = min(batch, stop - first)
            now = time.time()
            q.put([Item(f"t{first + j}", "work", 5, b'{"x": 1}' * 32, now) for j in range(n)])
            out.write(f"A {first} {n}\n")
            out.flush()
            first += n
        got = q.lease(batch, "w", 30.0, time.monotonic())
        back = [g.id for g in got if rng.random() < 0.2]  # "failed": redeliver
        done = [g.id for g in got if g.id not in set(back)]
        done += [i.id for i in q.nack(back)]  # exhausted: a failed outcome
        if done:
            out.write("K " + " ".join(done) + "\n")
            out.flush()
            q.ack(done)
            out.write("D " + " ".join(done) + "\n")
            out.flush()
    q.close()
    out.write("END\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
