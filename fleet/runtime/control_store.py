"""Where the controller keeps what it must not forget across a restart: per pool the agent
count and the autoscaling state (stabilization window, rate credit, cooldowns), the
decision timeline (its newest ``max_samples``), and the control actors' restart counts
it has already alerted on.

Two backends behind one interface, chosen like the queues' (``queues.storage``):

- ``MemoryControlStore`` keeps nothing beyond the process: a restarted controller
  starts from the spec's ``start_agents``, as it always did.
- ``SqliteControlStore`` writes ``<fleet directory>/control.sqlite3`` (WAL,
  ``synchronous=NORMAL``), one transaction per control tick. NORMAL is enough: a
  committed tick survives a kill of the process; a power loss may lose the last ticks,
  and the restored state is then older, which only makes it hold more agents longer.

Times. ``ScalingState`` holds times of the controller's monotonic clock, which another
process (a restart on another node, or after a reboot) does not share. So a time is
stored as its *age* at the save: seconds before the tick that saved it. Loading anchors
the ages at the loading process's ``now``, so the controller resumes as if no time had
passed while it was down. That is the safe reading: a dead controller observed nothing,
so its downtime is no evidence that load fell. The stabilization window therefore still
holds, after the restart, exactly the samples it held at the kill, and the pool can
only scale below them once they age out on fresh observations; rate credit does not
bank the downtime either. (Scale-up is never held back by the window; at worst an
up-scale cooldown lasts the downtime longer.)
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from fleet.policy.autoscaling import ScalingState
from fleet.queue.storage import StorageError, fleet_directory, open_wal, storage_error
from fleet.spec.queues import StorageBackend, StorageSpec

CONTROL_FILE = "control.sqlite3"
SCHEMA_VERSION = 1
DEFAULT_MAX_SAMPLES = 100_000


# -- ScalingState <-> ages -------------------------------------------------------------
def _age(t: float | None, now_s: float) -> float | None:
    return None if t is None else now_s - t


def _at(age: float | None, now_s: float) -> float | None:
    return None if age is None else now_s - age


def _credit(c: float) -> float | str:
    return "inf" if math.isinf(c) else c  # JSON has no infinity


def state_to_ages(state: ScalingState, now_s: float) -> dict[str, Any]:
    """``state`` as JSON-ready data, every time as its age (s) at ``now_s``."""
    return {
        "last_tick_age_s": _age(state.last_tick_s, now_s),
        "last_up_age_s": _age(state.last_up_s, now_s),
        "last_down_age_s": _age(state.last_down_s, now_s),
        "up_credit": _credit(state.up_credit),
        "down_credit": _credit(state.down_credit),
        "window": [[now_s - t, raw] for t, raw in state.window],
    }


def state_from_ages(data: Mapping[str, Any], now_s: float) -> ScalingState:
    """The state ``state_to_ages`` saved, its ages anchored at ``now_s`` (this
    process's clock): the window and cooldowns resume where they were at the save."""
    return ScalingState(
        last_tick_s=_at(data.get("last_tick_age_s"), now_s),
        last_up_s=_at(data.get("last_up_age_s"), now_s),
        last_down_s=_at(data.get("last_down_age_s"), now_s),
        up_credit=float(data.get("up_credit", 0.0)),
        down_credit=float(data.get("down_credit", 0.0)),
        window=tuple((now_s - float(age), int(raw)) for age, raw in data.get("window", ())),
    )


def resume_t_s(timeline: Sequence[Mapping[str, Any]], wall_now_s: float) -> float:
    """Where a restarted controller's timeline ``t_s`` carries on: the last saved
    sample's ``t_s`` plus the wall-clock time since it (never less: a clock set back
    does not make the timeline run backwards); 0 for an empty timeline."""
    if not timeline:
        return 0.0
    last = timeline[-1]
    return float(last["t_s"]) + max(0.0, wall_now_s - float(last["unix_s"]))


# -- what is saved and loaded ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolControl:
    """One pool's control state: the agent count it runs and its autoscaling state."""

    agents: int
    state: ScalingState


@dataclass(frozen=True, slots=True)
class ControlSnapshot:
    """What a restarted controller resumes from (times on the loader's clock)."""

    pools: dict[str, PoolControl] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    restarts_seen: dict[str, int] = field(default_factory=dict)


class ControlStore(Protocol):
    """Durable (or not) home of the controller's state."""

    #: True when what is saved outlives the process.
    durable: bool

    def save(
        self,
        now_s: float,
        pools: Mapping[str, PoolControl],
        samples: Sequence[dict[str, Any]],
        restarts_seen: Mapping[str, int] | None = None,
    ) -> None:
        """One tick, in one transaction: every pool's state (times taken at ``now_s``),
        the tick's timeline samples, and, when given, the restart counts seen."""

    def load(self, now_s: float) -> ControlSnapshot:
        """Everything saved, times anchored at ``now_s`` (see the module doc)."""

    def reset(self) -> None:
        """Forget everything (a fresh deploy starts a new run)."""

    def close(self) -> None:
        """Release the backend."""


class MemoryControlStore:
    """Kept in this object only: survives a new controller in the same process (tests),
    not a process death."""

    durable = False

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES):
        self.max_samples = max_samples
        self.reset()

    def save(
        self,
        now_s: float,
        pools: Mapping[str, PoolControl],
        samples: Sequence[dict[str, Any]],
        restarts_seen: Mapping[str, int] | None = None,
    ) -> None:
        self._pools.update(
            {name: (pc.agents, state_to_ages(pc.state, now_s)) for name, pc in pools.items()}
        )
        self._timeline.extend(samples)  # the caller never changes a sample it saved
        if restarts_seen is not None:
            self._restarts = dict(restarts_seen)

    def load(self, now_s: float) -> ControlSnapshot:
        return ControlSnapshot(
            {
                name: PoolControl(agents, state_from_ages(ages, now_s))
                for name, (agents, ages) in self._pools.items()
            },
            [dict(s) for s in self._timeline],
            dict(self._restarts),
        )

    def reset(self) -> None:
        self._pools: dict[str, tuple[int, dict[str, Any]]] = {}
        self._timeline: deque[dict[str, Any]] = deque(maxlen=self.max_samples)
        self._restarts: dict[str, int] = {}

    def close(self) -> None:
        pass


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS pools (name TEXT PRIMARY KEY, agents INTEGER NOT NULL,"
    " state TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS timeline (seq INTEGER PRIMARY KEY, sample BLOB NOT NULL)",
)


class SqliteControlStore:
    """The controller's state in a SQLite file in WAL mode; one transaction per tick.

    The timeline is a table keyed by a sequence number: a tick appends at its end and
    trims its start to the newest ``max_samples`` (a primary-key range delete). Pools
    are one row each, replaced every tick. One process per file (the controller).
    """

    durable = True

    def __init__(self, path: str | os.PathLike[str], max_samples: int = DEFAULT_MAX_SAMPLES):
        self.path = Path(path)
        self.max_samples = max_samples
        try:
            self._db = open_wal(self.path)  # one transaction per tick
            for ddl in _SCHEMA:
                self._db.execute(ddl)
            self._check_version()
            self._next_seq = (
                self._db.execute("SELECT MAX(seq) FROM timeline").fetchone()[0] or 0
            ) + 1
        except StorageError:
            raise
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(self.path, exc) from None

    def _check_version(self) -> None:
        row = self._db.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        elif row[0] != str(SCHEMA_VERSION):
            self._db.close()
            raise StorageError(
                f"control state {self.path} has schema version {row[0]}; this fleet reads "
                f"version {SCHEMA_VERSION}. Move the file away (the controller then "
                "starts from the spec) or run the fleet version that wrote it."
            )

    def save(
        self,
        now_s: float,
        pools: Mapping[str, PoolControl],
        samples: Sequence[dict[str, Any]],
        restarts_seen: Mapping[str, int] | None = None,
    ) -> None:
        rows = [
            (name, pc.agents, json.dumps(state_to_ages(pc.state, now_s)))
            for name, pc in pools.items()
        ]
        seq = self._next_seq
        lines = [(seq + k, orjson.dumps(s)) for k, s in enumerate(samples)]
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO pools (name, agents, state) VALUES (?, ?, ?)", rows
                )
                if lines:
                    db.executemany("INSERT INTO timeline (seq, sample) VALUES (?, ?)", lines)
                    db.execute(
                        "DELETE FROM timeline WHERE seq <= ?",
                        (seq + len(lines) - 1 - self.max_samples,),
                    )
                if restarts_seen is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('restarts_seen', ?)",
                        (json.dumps(restarts_seen),),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from None
        self._next_seq = seq + len(lines)

    def load(self, now_s: float) -> ControlSnapshot:
        db = self._db
        try:
            pools = {
                name: PoolControl(int(agents), state_from_ages(json.loads(state), now_s))
                for name, agents, state in db.execute("SELECT name, agents, state FROM pools")
            }
            timeline = [
                orjson.loads(s)
                for (s,) in db.execute("SELECT sample FROM timeline ORDER BY seq")
            ]
            row = db.execute("SELECT value FROM meta WHERE key = 'restarts_seen'").fetchone()
        except (sqlite3.Error, ValueError) as exc:
            raise storage_error(self.path, exc) from None
        return ControlSnapshot(pools, timeline, json.loads(row[0]) if row else {})

    def reset(self) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            db.execute("DELETE FROM pools")
            db.execute("DELETE FROM timeline")
            db.execute("DELETE FROM meta WHERE key != 'schema_version'")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from None
        self._next_seq = 1

    def close(self) -> None:
        self._db.close()


def control_path(spec: StorageSpec, namespace: str, fleet: str) -> Path:
    """``<directory>/<namespace>/<fleet>/control.sqlite3``."""
    return fleet_directory(spec, namespace, fleet) / CONTROL_FILE


def make_control_store(
    spec: StorageSpec, namespace: str, fleet: str, max_samples: int = DEFAULT_MAX_SAMPLES
) -> MemoryControlStore | SqliteControlStore:
    """The controller's store as ``queues.storage`` says: SQLite next to the queues'
    files, or memory."""
    if spec.backend is StorageBackend.SQLITE:
        return SqliteControlStore(control_path(spec, namespace, fleet), max_samples)
    if spec.backend is StorageBackend.MEMORY:
        return MemoryControlStore(max_samples)
    raise ValueError(f"unknown storage backend {spec.backend!r}")


__all__ = [
    "CONTROL_FILE",
    "SCHEMA_VERSION",
    "ControlSnapshot",
    "ControlStore",
    "MemoryControlStore",
    "PoolControl",
    "SqliteControlStore",
    "control_path",
    "make_control_store",
    "resume_t_s",
    "state_from_ages",
    "state_to_ages",
]
