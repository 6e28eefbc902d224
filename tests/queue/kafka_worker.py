"""A consumer process for the Kafka tests: runs a KafkaIntake and "records" each task.

Recording = one line ``R <task id>`` on stdout, flushed before the task is reported
complete to the intake, so a record always precedes the offset commit that covers it
(the order the real runtime keeps: ledger first, then ``complete``). ``--rate`` caps
tasks per second so a test can kill the process mid-run.

Run: python -m tests.queue.kafka_worker --bootstrap HOST:PORT --topic T --group G
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from fleet.queue.kafka_intake import KafkaIntake, task_parser
from fleet.spec.queues import KafkaIntakeSpec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--name", default="worker")
    ap.add_argument("--rate", type=float, default=0.0, help="max tasks/s (0: unlimited)")
    ap.add_argument("--session-timeout-s", type=float, default=6.0)
    args = ap.parse_args()

    spec = KafkaIntakeSpec(
        bootstrap_servers=args.bootstrap,
        topic=args.topic,
        group_id=args.group,
        max_poll_records=500,
        commit_interval_s=0.2,
        session_timeout_s=args.session_timeout_s,
        heartbeat_interval_s=0.5,
    )
    out = sys.stdout
    t0 = time.monotonic()
    done = 0
    intake: KafkaIntake

    def accept(items):
        nonlocal done
        out.write("".join(f"R {it.id}\n" for it in items))
        out.flush()  # recorded before complete(): the commit never outruns the ledger
        for it in items:
            intake.complete(it.id)
        done += len(items)
        if args.rate:
            ahead = done / args.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        return None

    intake = KafkaIntake(spec, accept, task_parser({"work"}, 64 * 1024), client_id=args.name)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out.write(f"S {args.name}\n")
    out.flush()
    intake.run(stop)
    out.write(
        f"E {args.name} consumed={intake.stats.consumed} commits={intake.stats.commits}\n"
    )
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
