"""The driver-side API: an ``Electorate`` (voters placed on a reducer tree) and ``decide``.

Build the tree once and ask it many questions::

    with Electorate.start(voters, ConsensusSpec(mode="probabilistic")) as e:
        d = e.decide(Question("ship v2?", ("yes", "no")))

or, for a one-off, ``decide(question, voters=[...])`` builds and tears down a tree.
Decisions are memoized on the driver (``memo_ttl_s``; clock injected), keyed by the
question, the deciding policy and the electorate.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ray

from fleet.consensus.reducer import Reducer
from fleet.consensus.tree import TreePlan, plan_tree
from fleet.policy.consensus import (
    EMPTY_VOTERS,
    ConsensusError,
    Decision,
    DecisionMemo,
    Question,
    memo_key,
)
from fleet.policy.hashing import stable_hash64
from fleet.spec.consensus import ConsensusSpec

# How long past its own deadline the driver waits for the root before calling it lost.
ROOT_GRACE_S = 10.0
STARTUP_WAVE = 4  # reducer actors started at once


def as_policy(policy: ConsensusSpec | Mapping[str, Any] | None) -> ConsensusSpec:
    """A validated policy from a spec, a mapping (validated: bad fields raise with their
    name) or None (the defaults)."""
    if policy is None:
        return ConsensusSpec()
    if isinstance(policy, ConsensusSpec):
        return policy
    return ConsensusSpec.model_validate(dict(policy))


class Electorate:
    """Voters hosted on a tree of Ray reducer actors, ready to decide questions.

    ``policy.fan_out`` and ``policy.max_reducers`` shape the actor tree when it starts;
    a per-call policy may change everything else (mode, confidence, timeouts...).
    """

    def __init__(
        self,
        name: str,
        plan: TreePlan,
        actors: list[Any],
        root: Any,
        policy: ConsensusSpec,
        clock: Callable[[], float],
    ):
        self.name, self.plan, self.policy = name, plan, policy
        self._actors, self._root = actors, root
        self._memo = DecisionMemo(clock)

    @classmethod
    def start(
        cls,
        voters: Iterable[Any],
        policy: ConsensusSpec | Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Electorate:
        """Place ``voters`` on leaf reducers and build the tree above them (blocks until
        every actor is up). Raises ConsensusError for an empty voter set."""
        voters = list(voters)
        if not voters:
            raise ConsensusError(EMPTY_VOTERS)
        policy = as_policy(policy)
        name = name or f"e{uuid.uuid4().hex[:8]}"
        plan = plan_tree(
            [getattr(v, "group", None) for v in voters], policy.fan_out, policy.max_reducers
        )
        actors: list[Any] = []

        def spawn(nodes: list[tuple[str, dict[str, Any]]]) -> list[Any]:
            # A few at a time: each actor is a new worker process, and starting many at
            # once on 2 cores only makes them all slower (and Ray warns about it).
            out = []
            for i in range(0, len(nodes), STARTUP_WAVE):
                wave = [
                    Reducer.options(name=f"consensus.{name}.{n}").remote(**kw)
                    for n, kw in nodes[i : i + STARTUP_WAVE]
                ]
                actors.extend(wave)
                out.extend(wave)
                ray.get([a.ready.remote() for a in wave])
            return out

        try:
            level = spawn(
                [
                    (
                        f"leaf{j}",
                        {
                            "leaf_offsets": plan.offsets,
                            "groups": groups,
                            "leaf_index": j,
                            "voters": [
                                voters[p]
                                for p in plan.order[plan.offsets[j] : plan.offsets[j + 1]]
                            ],
                        },
                    )
                    for j, groups in enumerate(plan.leaves)
                ]
            )
            # Each node's leaf range, so requests for a sample reach only the right subtrees.
            spans = [(j, j + 1) for j in range(len(plan.leaves))]
            for depth, nodes in enumerate(plan.levels, start=1):
                level = spawn(
                    [
                        (
                            f"l{depth}n{i}",
                            {
                                "leaf_offsets": plan.offsets,
                                "children": level[lo:hi],
                                "child_leaves": spans[lo:hi],
                            },
                        )
                        for i, (lo, hi) in enumerate(nodes)
                    ]
                )
                spans = [(spans[lo][0], spans[hi - 1][1]) for lo, hi in nodes]
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return cls(name, plan, actors, level[0], policy, clock)

    @property
    def voters(self) -> int:
        return self.plan.voters

    @property
    def reducers(self) -> int:
        return len(self._actors)

    def _key(self, question: Question, policy: ConsensusSpec) -> str:
        return memo_key(question, policy, scope=self.name)

    async def decide_async(
        self, question: Question | str, policy: ConsensusSpec | Mapping[str, Any] | None = None
    ) -> Decision:
        """``decide`` for async callers (an actor, a Serve handler)."""
        q, pol = (
            Question.of(question),
            as_policy(policy) if policy is not None else self.policy,
        )
        key = self._key(q, pol)
        if (hit := self._memo.get(key)) is not None:
            return hit
        d = await self._root.decide.remote(q, pol)
        self._memo.put(key, d, pol.memo_ttl_s)
        return d

    def decide(
        self, question: Question | str, policy: ConsensusSpec | Mapping[str, Any] | None = None
    ) -> Decision:
        """Decide ``question`` (memoized for ``memo_ttl_s``); returns within about
        ``policy.timeout_s`` whatever the voters do."""
        q, pol = (
            Question.of(question),
            as_policy(policy) if policy is not None else self.policy,
        )
        key = self._key(q, pol)
        if (hit := self._memo.get(key)) is not None:
            return hit
        d = ray.get(self._root.decide.remote(q, pol), timeout=pol.timeout_s + ROOT_GRACE_S)
        self._memo.put(key, d, pol.memo_ttl_s)
        return d

    def invalidate(
        self,
        question: Question | str | None = None,
        policy: ConsensusSpec | Mapping[str, Any] | None = None,
    ) -> int:
        """Forget the memoized answer to ``question`` (under ``policy``, default the
        electorate's), or every answer when ``question`` is None. Returns how many."""
        if question is None:
            return self._memo.invalidate()
        pol = as_policy(policy) if policy is not None else self.policy
        return self._memo.invalidate(self._key(Question.of(question), pol))

    def shutdown(self) -> None:
        """Kill this electorate's reducer actors."""
        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def __enter__(self) -> Electorate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _fingerprint(voters: list[Any]) -> str:
    parts = (
        f"{getattr(v, 'id', i)}|{getattr(v, 'group', None)}" for i, v in enumerate(voters)
    )
    return f"{stable_hash64(*parts):016x}"


def decide(
    question: Question | str,
    voters: Electorate | Iterable[Any],
    policy: ConsensusSpec | Mapping[str, Any] | None = None,
    *,
    memo: DecisionMemo | None = None,
) -> Decision:
    """Decide ``question`` among ``voters``: an ``Electorate`` (reused, memoized there), or
    voter objects, for which a reducer tree is built for this one decision and torn down
    (pass a ``memo`` to reuse answers across such calls; keyed by the voters' ids).

    Raises ConsensusError for an empty voter set and pydantic's ValidationError (a
    ValueError naming the field) for a bad policy mapping.
    """
    if isinstance(voters, Electorate):
        return voters.decide(question, policy)
    voters = list(voters)
    if not voters:
        raise ConsensusError(EMPTY_VOTERS)
    q, pol = Question.of(question), as_policy(policy)
    key = memo_key(q, pol, scope=_fingerprint(voters)) if memo is not None else ""
    if memo is not None and (hit := memo.get(key)) is not None:
        return hit
    with Electorate.start(voters, pol) as electorate:
        d = electorate.decide(q)
    if memo is not None:
        memo.put(key, d, pol.memo_ttl_s)
    return d
