"""The reducer actor: a leaf hosts voters, an inner node merges its children's tallies,
and the root runs the decision.

One class plays all three roles so a one-leaf tree is one actor. A request carries a
time budget rather than a wall-clock deadline, so clocks never need to agree across
processes: each reducer waits for what is below it for ``wait_budget_s(budget)``, gives
its children ``child_budget_s(budget)`` and answers with whatever arrived. A subtree or
voter that has not answered by then is counted as missing, never waited for.
"""

from __future__ import annotations

import asyncio
import bisect
import time
import types
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from fleet.policy.consensus import (
    FAILED,
    MISSING,
    Decision,
    Question,
    Tally,
    Vote,
    as_vote,
    child_budget_s,
    root_reserve_s,
    seeded_rng,
    start_run,
    tally_groups,
    wait_budget_s,
)
from fleet.spec.consensus import ConsensusSpec

# Selection: leaf index -> the global voter indices asked on that leaf (None: everyone).
Selection = dict[int, list[int]] | None


@dataclass(slots=True)
class Partial:
    """A subtree's answer: its tally, per-voter votes (sampling modes only), the
    messages it took and the hop count from a vote to this tally."""

    tally: Tally
    votes: dict[int, Vote] = field(default_factory=dict)
    messages: int = 0
    depth: int = 0


async def _ask(voter: Any, question: Question) -> Vote | str:
    try:
        return as_vote(await voter.vote(question))
    except asyncio.CancelledError:
        raise
    except Exception:  # a voter that raises or answers garbage is a failed vote, not a crash
        return FAILED


@types.coroutine
def _resume(coro: Any, first: Any) -> Any:
    """Continue a coroutine that already ran its first step, inside a Task.

    Whatever the coroutine yields (a future it waits on, or None for "run me again") is
    passed up to the Task driving us, and what the Task sends or throws back is passed
    down, exactly as ``await`` would.
    """
    yielded = first
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # cancellation at the deadline, mostly
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(sent)
        except StopIteration as stop:
            return stop.value


def _start(voter: Any, question: Question) -> Vote | str | asyncio.Future:
    """Ask a voter, running its first step right away (Python 3.12's eager tasks, by
    hand): a voter that answers without waiting costs no Task and no trip through the
    event loop, which halves a leaf's cost per vote. One that does wait becomes a Task
    from where it suspended."""
    coro = _ask(voter, question)
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value
    return asyncio.ensure_future(_resume(coro, first))


@ray.remote(num_cpus=0, max_restarts=0)
class Reducer:
    """A node of the reducer tree (see the module docstring)."""

    def __init__(
        self,
        *,
        leaf_offsets: Sequence[int],
        voters: Sequence[Any] | None = None,
        groups: Sequence[tuple[str, int]] = (),
        leaf_index: int | None = None,
        children: Sequence[Any] = (),
        child_leaves: Sequence[tuple[int, int]] = (),
    ):
        self._offsets = list(leaf_offsets)  # global index of each leaf's first voter
        self._voters = list(voters) if voters is not None else None
        self._leaf = leaf_index
        # Leaf: local start index of each group, for grouping a sample by group.
        self._group_starts, start = [], 0
        self._groups = list(groups)
        for _, size in self._groups:
            self._group_starts.append(start)
            start += size
        self._children = list(children)
        self._child_leaves = list(child_leaves)  # (first leaf, end leaf) per child

    def ready(self) -> int:
        return len(self._voters) if self._voters is not None else len(self._children)

    # -- collecting --------------------------------------------------------------------
    async def collect(
        self, question: Question, selection: Selection, budget_s: float, fan_out: int
    ) -> Partial:
        """This subtree's partial tally, within ``budget_s`` seconds."""
        if self._voters is not None:
            return await self._collect_leaf(question, selection, budget_s, fan_out)
        parts = [p async for p in self._stream(question, selection, budget_s, fan_out)]
        return Partial(
            Tally.combine(p.tally for p in parts),
            {k: v for p in parts for k, v in p.votes.items()},
            sum(p.messages for p in parts),
            max((p.depth for p in parts), default=0),
        )

    async def _collect_leaf(
        self, question: Question, selection: Selection, budget_s: float, fan_out: int
    ) -> Partial:
        offset = self._offsets[self._leaf]
        if selection is None:
            local_groups = [
                range(s, s + size)
                for s, (_, size) in zip(self._group_starts, self._groups, strict=True)
            ]
        else:
            by_group: dict[int, list[int]] = {}
            for g in selection.get(self._leaf, ()):
                local = g - offset
                by_group.setdefault(
                    bisect.bisect_right(self._group_starts, local) - 1, []
                ).append(local)
            local_groups = [by_group[k] for k in sorted(by_group)]
        flat = [i for grp in local_groups for i in grp]
        outcomes: list[Any] = [_start(self._voters[i], question) for i in flat]
        futs = [o for o in outcomes if isinstance(o, asyncio.Future)]
        if futs:
            _, pending = await asyncio.wait(futs, timeout=wait_budget_s(budget_s))
            for f in pending:
                f.cancel()
            outcomes = [
                o
                if not isinstance(o, asyncio.Future)
                else o.result()
                if o.done() and not o.cancelled()
                else MISSING
                for o in outcomes
            ]
        grouped, k = [], 0
        for grp in local_groups:
            grouped.append(outcomes[k : k + len(grp)])
            k += len(grp)
        tally, messages, depth = tally_groups(grouped, fan_out)
        votes = (
            {}
            if selection is None
            else {
                offset + i: o
                for i, o in zip(flat, outcomes, strict=True)
                if isinstance(o, Vote)
            }
        )
        return Partial(tally, votes, messages, depth)

    def _asked(self, child: int, selection: Selection) -> tuple[Selection, int]:
        lo, hi = self._child_leaves[child]
        if selection is None:
            return None, self._offsets[hi] - self._offsets[lo]
        sub = {leaf: idx for leaf, idx in selection.items() if lo <= leaf < hi}
        return sub, sum(len(v) for v in sub.values())

    async def _stream(
        self, question: Question, selection: Selection, budget_s: float, fan_out: int
    ) -> AsyncIterator[Partial]:
        """Children's partials as they arrive; a child silent past the wait budget yields
        an all-missing tally for the voters it was asked about. Each reply costs two
        messages (request down, tally up); a lost reply costs one."""
        if self._voters is not None:  # a one-leaf tree: the root is the leaf
            yield await self._collect_leaf(question, selection, budget_s, fan_out)
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_budget_s(budget_s)
        sub_budget = child_budget_s(budget_s)
        pending: dict[asyncio.Future, int] = {}
        asked: dict[int, int] = {}
        for c, child in enumerate(self._children):
            sub, n = self._asked(c, selection)
            if n == 0:
                continue
            asked[c] = n
            ref = child.collect.remote(question, sub, sub_budget, fan_out)
            pending[asyncio.ensure_future(ref)] = c
        try:
            while pending:
                left = until - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for fut in done:
                    c = pending.pop(fut)
                    try:
                        p = fut.result()
                    except Exception:  # a dead child: its voters are missing
                        yield Partial(Tally(eligible=asked[c]), messages=1, depth=1)
                        continue
                    yield Partial(p.tally, p.votes, p.messages + 2, p.depth + 1)
            late = list(pending.values())
        finally:  # also when the root stops listening early (a settled decision)
            for fut in pending:
                fut.cancel()
        for c in late:
            yield Partial(Tally(eligible=asked[c]), messages=1, depth=1)

    # -- deciding (root only) ----------------------------------------------------------
    def _route(self, voters: Sequence[int]) -> dict[int, list[int]]:
        sel: dict[int, list[int]] = {}
        for g in voters:
            sel.setdefault(bisect.bisect_right(self._offsets, g) - 1, []).append(g)
        return sel

    async def decide(self, question: Question, policy: ConsensusSpec) -> Decision:
        """Run one decision over the whole tree and return it by ``policy.timeout_s``."""
        clock = time.monotonic
        t0 = clock()
        deadline = t0 + policy.timeout_s
        population = self._offsets[-1]
        run = start_run(policy, question, population, seeded_rng(policy, question))
        messages = depth = 0
        verdict = None
        while verdict is None:
            # Keep a margin for the verdict and the reply to the caller.
            remaining = child_budget_s(deadline - clock() - root_reserve_s(policy.timeout_s))
            req = run.next_request() if remaining > 0 else None
            if req is None:
                verdict = run.verdict(final=True)
                break
            budget = remaining if req.budget_s is None else min(remaining, req.budget_s)
            selection = None if req.voters is None else self._route(req.voters)
            stream = self._stream(question, selection, budget, policy.fan_out)
            async for part in stream:
                run.observe(part.tally, part.votes)
                messages += part.messages
                depth = max(depth, part.depth)
                if run.streams:
                    verdict = run.verdict(final=False)
                    if verdict is not None:
                        break  # settled early: later subtrees cannot change the outcome
            await stream.aclose()
            if verdict is None and not run.streams:
                verdict = run.verdict(final=False)
        return Decision(
            question=question,
            option=verdict.option,
            reason=verdict.reason,
            tally=run.tally,
            confidence=verdict.confidence,
            share=verdict.share,
            mode=policy.mode.value,
            voters=population,
            messages=messages,
            depth=depth,
            rounds=run.rounds,
            elapsed_s=clock() - t0,
            timeout_s=policy.timeout_s,
        )
