"""Voters: logical agents that answer a question with a vote.

Any object with an ``id``, an optional ``group`` (department, region) and an async
``vote(question)`` returning a ``Vote`` (or an option string, a tuple or a mapping) can
vote. ``SimulatedVoter`` is a stand-in with a configurable bias, latency and failure
mode, used by tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from fleet.policy.consensus import Question, Vote
from fleet.policy.hashing import STABLE_HASH_SPAN, stable_hash64


@runtime_checkable
class Voter(Protocol):
    id: str

    async def vote(self, question: Question) -> Any: ...


class Failure(str, Enum):
    NONE = "none"
    DEAD = "dead"  # never answers
    SLOW = "slow"  # answers after ``slow_latency_s``
    ERROR = "error"  # raises


@dataclass(slots=True)
class SimulatedVoter:
    """A voter with a fixed opinion per question, drawn from its bias.

    ``bias`` is the probability of the first option (the question's options, or this
    voter's own); the rest is spread evenly over the others. The opinion depends only
    on (seed, id, question), so the same voter gives the same answer in any process and
    the exact majority can be computed without asking it (``opinion``). ``latency_s`` is
    how long a healthy voter takes to answer, in seconds.
    """

    id: str
    bias: float = 0.5
    options: tuple[str, ...] = ("yes", "no")
    group: str | None = None
    weight: float = 1.0
    confidence: float = 1.0
    latency_s: float = 0.0
    failure: Failure = Failure.NONE
    slow_latency_s: float = 3_600.0
    seed: int = 0

    def opinion(self, question: Question) -> str:
        options = question.options or self.options
        u = stable_hash64(self.seed, self.id, question.key) / STABLE_HASH_SPAN
        if u < self.bias or len(options) == 1:
            return options[0]
        rest = options[1:]
        return rest[min(len(rest) - 1, int((u - self.bias) / (1 - self.bias) * len(rest)))]

    async def vote(self, question: Question) -> Vote:
        failure = Failure(self.failure)
        if failure is Failure.DEAD:
            await asyncio.Event().wait()  # never set: cancelled at the leaf's deadline
        delay = self.slow_latency_s if failure is Failure.SLOW else self.latency_s
        if delay > 0:
            await asyncio.sleep(delay)
        if failure is Failure.ERROR:
            raise RuntimeError(f"voter {self.id} failed to vote")
        return Vote(self.opinion(question), self.weight, self.confidence)


def make_voters(
    n: int,
    *,
    bias: float = 0.6,
    dead_share: float = 0.0,
    slow_share: float = 0.0,
    error_share: float = 0.0,
    groups: tuple[str, ...] = (),
    latency_s: float = 0.0,
    slow_latency_s: float = 3_600.0,
    seed: int = 0,
) -> list[SimulatedVoter]:
    """``n`` simulated voters; which ones are dead, slow or failing is drawn from ``seed``.

    Voters are spread round-robin over ``groups`` (e.g. regions) when any are given.
    """
    rng = random.Random(seed)
    picks = list(range(n))
    rng.shuffle(picks)
    n_dead, n_slow, n_err = (
        round(n * dead_share),
        round(n * slow_share),
        round(n * error_share),
    )
    failure = dict.fromkeys(picks[:n_dead], Failure.DEAD)
    failure.update(dict.fromkeys(picks[n_dead : n_dead + n_slow], Failure.SLOW))
    failure.update(
        dict.fromkeys(picks[n_dead + n_slow : n_dead + n_slow + n_err], Failure.ERROR)
    )
    return [
        SimulatedVoter(
            id=f"v{i}",
            bias=bias,
            group=groups[i % len(groups)] if groups else None,
            latency_s=latency_s,
            failure=failure.get(i, Failure.NONE),
            slow_latency_s=slow_latency_s,
            seed=seed,
        )
        for i in range(n)
    ]
