"""An agent whose latency and hangs are injected at run time through a chaos switchboard.

The switchboard is a small named Ray actor holding *rules*: "agents whose id is X (or
starts with P, or a share S of them) add ``extra_s`` of latency / hang / are cut off
until time T". ``fleet.chaos.ChaosHarness`` writes the rules; every ``ChaoticAgent``
reads them. Agents never call the switchboard on their hot path: each host process
keeps one cached copy of the rules, refreshed in the background at most every
``REFRESH_S`` seconds, and the refresh call also carries the agents' hit counts back, so
a 100,000-task run makes a few hundred switchboard calls, not 100,000.

Rule kinds:
- ``latency``: add ``extra_s`` seconds before the task's work.
- ``hang``: hold the task until the rule ends (a hung agent: the host's watchdog fails
  it with reason ``timeout`` after ``task_timeout_s`` and the retry policy sends it back
  to the queue).
- ``partition``: the same as ``hang`` for every agent the rule matches (a pool): work
  sent to the pool gets no answer until the partition heals, as if the pool were cut off
  from the dispatcher. Tasks held longer than ``task_timeout_s`` time out and are retried.
- ``fail``: the agent is broken: its tasks raise ``ChaosFault`` (retryable), its
  ``heartbeat`` raises and a restarted instance's ``setup`` raises, until the rule ends.
  Health detection takes it out of service and restarts it (the ``Health`` stage of
  ``fleet.policy.host.HostCore``); many agents failing at once exercise the cascade
  guard.

Times in rules are Unix seconds (``time.time()``): the harness and the hosts share them
on one machine, and on a cluster they are as close as the nodes' clocks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import ray

from fleet.agent import Agent
from fleet.policy.hashing import STABLE_HASH_SPAN, stable_hash64
from fleet.task import Task

REFRESH_S = 0.25
SWITCHBOARD_CALL_TIMEOUT_S = 2.0
MAX_HIT_EVENTS = 10_000  # hang/partition hits the switchboard keeps (one per held task)

LATENCY = "latency"
HANG = "hang"
PARTITION = "partition"
FAIL = "fail"
KINDS = (LATENCY, HANG, PARTITION, FAIL)


class ChaosFault(ConnectionError):
    """An injected failure of a broken agent (a ConnectionError: retryable by default)."""


def rule_matches(rule: dict[str, Any], agent_id: str) -> bool:
    """Whether ``rule`` targets ``agent_id``: listed exactly, or under its prefix and
    inside its share (a stable hash of the id, so an agent is in or out for good)."""
    agents = rule.get("agents")
    if agents is not None:
        return agent_id in agents
    if not agent_id.startswith(rule.get("prefix", "")):
        return False
    share = rule.get("share", 1.0)
    if share >= 1.0:
        return True
    return stable_hash64(rule["id"], agent_id) / STABLE_HASH_SPAN < share


@ray.remote(num_cpus=0)
class Switchboard:
    """The chaos rules of one fleet, and what the agents report having applied."""

    def __init__(self) -> None:
        self._rules: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._hits: Counter[int] = Counter()
        self._events: list[dict[str, Any]] = []

    async def add(self, rule: dict[str, Any]) -> int:
        """Add a rule (``kind``, ``start_unix_s``, ``until_unix_s``, target); its id."""
        if rule.get("kind") not in KINDS:
            raise ValueError(f"rule kind {rule.get('kind')!r} is not one of {KINDS}")
        rid = self._next
        self._next += 1
        self._rules[rid] = {**rule, "id": rid}
        return rid

    async def clear(self) -> None:
        self._rules.clear()

    async def sync(
        self, hits: dict[int, int], events: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """An agent process reports its hits and gets the rules still in force."""
        self._hits.update(hits)
        room = MAX_HIT_EVENTS - len(self._events)
        if room > 0:
            self._events.extend(events[:room])
        now = time.time()
        for rid in [r for r, rule in self._rules.items() if rule["until_unix_s"] < now]:
            del self._rules[rid]  # expired: nobody needs it any more
        return list(self._rules.values())

    async def report(self) -> dict[str, Any]:
        """Hits per rule id and the logged hang/partition hits (agent, task, time)."""
        return {"hits": dict(self._hits), "events": list(self._events)}


class _BoardView:
    """One host process's cached copy of a switchboard's rules, and its unsent hits."""

    def __init__(self, name: str, namespace: str):
        self.name = name
        self.namespace = namespace
        self.rules: list[dict[str, Any]] = []
        self.fetched_s = -float("inf")
        self.hits: Counter[int] = Counter()
        self.events: list[dict[str, Any]] = []
        self._handle: Any = None
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Start a background refresh if the copy is stale and none is running."""
        if time.monotonic() - self.fetched_s < REFRESH_S:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        hits, self.hits = self.hits, Counter()
        events, self.events = self.events, []
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            self.rules = await asyncio.wait_for(
                self._handle.sync.remote(dict(hits), events), SWITCHBOARD_CALL_TIMEOUT_S
            )
        except Exception as exc:
            # Keep the hits for next time. A slow switchboard (a loaded machine) leaves
            # the cached rules in force: each ends by its own ``until_unix_s``, and
            # dropping them would end a hang or a latency injection early. No
            # switchboard (yet, or any more) means no chaos.
            if not isinstance(exc, asyncio.TimeoutError):
                self._handle = None
                self.rules = []
            self.hits.update(hits)
            self.events = (events + self.events)[:MAX_HIT_EVENTS]
        self.fetched_s = time.monotonic()


_views: dict[tuple[str, str], _BoardView] = {}


def _view(name: str, namespace: str) -> _BoardView:
    key = (name, namespace)
    v = _views.get(key)
    if v is None:
        v = _views[key] = _BoardView(name, namespace)
    return v


class ChaoticAgent(Agent):
    """Sleeps ``delay_s`` (or ``payload["sleep_s"]``) and echoes the payload, after
    applying whatever the switchboard ``switchboard`` (in ``switchboard_namespace``)
    injects for this agent. Without a switchboard name it never misbehaves."""

    capabilities = ("chaos",)

    def __init__(
        self,
        agent_id: str,
        delay_s: float = 0.0,
        switchboard: str | None = None,
        switchboard_namespace: str = "fleet",
        **kwargs: Any,
    ):
        super().__init__(agent_id, **kwargs)
        self.delay_s = delay_s
        self._board = _view(switchboard, switchboard_namespace) if switchboard else None

    def _broken(self) -> dict[str, Any] | None:
        """The ``fail`` rule in force for this agent, if any (refreshes the rules)."""
        board = self._board
        if board is None:
            return None
        board.poke()
        now = time.time()
        for rule in board.rules:
            if (
                rule["kind"] == FAIL
                and rule["start_unix_s"] <= now < rule["until_unix_s"]
                and rule_matches(rule, self.agent_id)
            ):
                board.hits[rule["id"]] += 1
                return rule
        return None

    async def setup(self) -> None:
        if (rule := self._broken()) is not None:
            raise ChaosFault(
                f"agent {self.agent_id} broken by chaos rule {rule['id']}: setup failed"
            )

    async def heartbeat(self) -> None:
        if (rule := self._broken()) is not None:
            raise ChaosFault(f"agent {self.agent_id} broken by chaos rule {rule['id']}")

    async def handle(self, task: Task) -> Any:
        board = self._board
        if board is not None:
            board.poke()
            if board.rules:
                await self._inject(board, task)
        p = task.payload if isinstance(task.payload, dict) else {}
        delay = float(p.get("sleep_s", self.delay_s))
        if delay > 0:
            await asyncio.sleep(delay)
        return task.payload

    async def _inject(self, board: _BoardView, task: Task) -> None:
        now = time.time()
        extra = 0.0
        hold_until = 0.0
        for rule in board.rules:
            if not (rule["start_unix_s"] <= now < rule["until_unix_s"]):
                continue
            if not rule_matches(rule, self.agent_id):
                continue
            board.hits[rule["id"]] += 1
            if rule["kind"] == FAIL:
                raise ChaosFault(f"agent {self.agent_id} broken by chaos rule {rule['id']}")
            if rule["kind"] == LATENCY:
                extra += float(rule.get("extra_s", 0.0))
            else:
                hold_until = max(hold_until, rule["until_unix_s"])
                board.events.append(
                    {
                        "rule": rule["id"],
                        "kind": rule["kind"],
                        "agent_id": self.agent_id,
                        "task_id": task.id,
                        "unix_s": now,
                    }
                )
        if hold_until > now:
            # Cancelled by the host's watchdog if this outlasts task_timeout_s.
            await asyncio.sleep(hold_until - now)
        if extra > 0:
            await asyncio.sleep(extra)


__all__ = ["ChaosFault", "ChaoticAgent", "Switchboard", "rule_matches"]
