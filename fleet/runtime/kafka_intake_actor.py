"""KafkaIntakeActor: one consumer of a fleet's Kafka intake, as a named Ray actor.

A fleet whose spec has ``queues.kafka`` runs ``consumers`` of these in one consumer
group (``deploy`` starts them after the queue shards and the ledger). Each wraps a
``fleet.queue.kafka_intake.KafkaIntake`` and supplies the two things it needs from the
runtime:

- ``accept``: valid tasks go into the queue shards by the same path as
  ``FleetClient.submit_items``; ids the ledger already holds (a message redelivered
  after a consumer died before committing, or a task submitted again) are not enqueued
  again but finish at once; an idempotency key already recorded with another payload
  is not run either, and is counted (``idempotency_conflicts``).
- completion: a task is finished once its outcome is in the ledger. The actor polls the
  ledger for the ids it has in flight every ``ledger_poll_s`` and reports the recorded
  ones to the intake, whose ``OffsetTracker`` commits a partition only below its lowest
  unrecorded offset. So the committed offset never passes a task whose outcome could
  still be lost, and a redelivery maps (by the record's stable id) onto the ledger
  entry it already has: at-least-once delivery, exactly-once recording.

The consumer loop runs on a thread of its own; the actor's methods (``stats``, ``stop``)
are served beside it. Everything touching the Kafka clients runs on that thread.

TLS and SASL (``queues.kafka.security``) are applied by ``KafkaIntake`` when it builds
its clients, here in the actor's process: the variables named by ``password_env`` and
``ssl_password_env`` must be set in the environment of the Ray nodes that run these
actors, and the TLS files must exist there. If one is missing the actor fails to start
with an error naming the variable or file (never a secret value).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import ray

from fleet.policy.admission import DEADLINE_EXCEEDED
from fleet.queue.kafka_intake import KafkaIntake, NotAdmitted, task_parser
from fleet.runtime.admission_gate import AdmissionGate
from fleet.runtime.enqueue import put_items
from fleet.runtime.ledger import LedgerClient
from fleet.runtime.lifecycle import on_start
from fleet.runtime.names import Names
from fleet.security.redact import redactor_for
from fleet.spec.fleet import FleetSpec
from fleet.task import Item, split_known

# A full queue holds the loop at most this long per attempt; the intake keeps the batch
# and retries (partitions stay paused meanwhile, the group membership stays alive).
ACCEPT_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 8.0  # below teardown's 10 s wait for stop()


@ray.remote(num_cpus=0, max_concurrency=4)
class KafkaIntakeActor:
    def __init__(self, spec: dict[str, Any], index: int):
        fleet = FleetSpec.model_validate(spec)
        kafka = fleet.queues.kafka
        if kafka is None:
            raise ValueError("queues.kafka is not set: this fleet has no Kafka intake")
        self.kafka = kafka
        self.index = index
        names = Names(fleet.name)
        ns = fleet.namespace
        on_start(ns, names.kafka_intake(index))
        self._ledger = LedgerClient.for_spec(fleet)
        self._conflicts = 0
        self._shards = {
            cap: [
                ray.get_actor(names.shard(cap, i), namespace=ns)
                for i in range(fleet.queues.shards)
            ]
            for cap in fleet.capabilities
        }
        self._admission = AdmissionGate(
            fleet, lambda: ray.get_actor(names.controller, namespace=ns)
        )
        self._counted: set[str] = set()  # held back, their refusal already counted
        self._intake = KafkaIntake(
            kafka,
            self._accept,
            task_parser(fleet.capabilities, fleet.queues.max_payload_bytes),
            client_id=names.kafka_intake(index),
            redact=redactor_for(fleet).text,
        )
        self._stop = threading.Event()
        self._error: str | None = None
        self._ledger_polls = 0
        self._thread = threading.Thread(target=self._run, name="kafka-intake", daemon=True)
        self._thread.start()

    # --- the consumer thread -------------------------------------------------------------

    def _run(self) -> None:
        last_poll = time.monotonic()
        try:
            while not self._stop.is_set():
                self._intake.run_once()
                if time.monotonic() - last_poll >= self.kafka.ledger_poll_s:
                    self._poll_ledger()
                    last_poll = time.monotonic()
            self._poll_ledger()  # commit on the way out what the ledger already holds
        except Exception as exc:  # reported by stats(); nothing committed
            self._error = f"{type(exc).__name__}: {exc}"
            self._intake.close(commit=False)
            raise
        self._intake.close()

    def _accept(self, items: list[Item]) -> list[str]:
        ids = [it.id for it in items]
        fresh, existing, conflicts = split_known(items, dict(zip(ids, self._ledger.get(ids))))
        self._conflicts += len(conflicts)
        known = [*existing, *conflicts]  # already recorded (or refused): finished
        self._admission.refresh()
        # (Never answered from a degrade rule's cache: a redelivered message must find
        # the task it queued before, which only the queue knows.)
        admitted, refused = self._admission.split(fresh, count=False)
        # Kafka pauses instead of refusing. A task that would miss its deadline is
        # queued all the same: its shard records it failed (deadline_exceeded) when the
        # deadline passes, unless it ran by then, so its offset can be committed.
        late = {r.id for r in refused if r.reason == DEADLINE_EXCEEDED}
        held = {r.id for r in refused} - late
        admitted += [it for it in fresh if it.id in late]
        walled = put_items(self._shards, admitted, ACCEPT_TIMEOUT_S)
        # A task over its tenant's bulkhead is held like a shed one.
        refused += self._admission.bulkhead_refused(
            walled, {it.id: k for k, it in enumerate(fresh)}, count=False
        )
        held |= {it.id for it in walled}
        # A backlog is decided again each round: a held task is counted once, as shed
        # (the late ones are queued, so they are not refusals).
        by_id = {it.id: it for it in fresh}
        for r in refused:
            if r.id in held and r.id not in self._counted:
                self._admission.count_refusal(by_id[r.id], r.reason)
        self._counted = held
        if held:
            wait = max(r.retry_after_s for r in refused if r.id in held)
            rest = [it for it in fresh if it.id in held]
            raise NotAdmitted(rest, known, max(wait, self._admission.interval_s))
        return known

    def _poll_ledger(self) -> None:
        ids = self._intake.in_flight_ids()
        if not ids:
            return
        self._ledger_polls += 1
        if self.kafka.results_topic:
            # The outcome is published to the results topic before the offset may pass.
            for task_id, outcome in zip(ids, self._ledger.get(ids)):
                if outcome is not None:
                    self._intake.complete(task_id, outcome)
            return
        missing = set(self._ledger.missing(ids))
        for task_id in ids:
            if task_id not in missing:
                self._intake.complete(task_id)

    # --- actor methods -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Consumption, commit and error counts of this consumer."""
        return {
            "consumer": self.index,
            "running": self._thread.is_alive(),
            "error": self._error,
            "ledger_polls": self._ledger_polls,
            "idempotency_conflicts": self._conflicts,
            **dataclasses.asdict(self._intake.stats),
        }

    def stop(self) -> dict[str, Any]:
        """Stop consuming, commit what the ledger holds, close the clients (idempotent)."""
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT_S)
        return self.stats()


__all__ = ["KafkaIntakeActor"]
