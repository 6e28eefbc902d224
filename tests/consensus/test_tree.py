"""Reducer-tree planning and simulated voters (no Ray cluster needed)."""

from __future__ import annotations

import asyncio
import math

import pytest

from fleet.consensus import (
    ConsensusError,
    Failure,
    Question,
    SimulatedVoter,
    Vote,
    decide,
    make_voters,
    plan_tree,
)
from fleet.consensus.tree import internal_nodes


@pytest.mark.parametrize("n", [1, 10, 255, 1_000, 10_000, 100_000])
@pytest.mark.parametrize("fan_out,max_reducers", [(2, 3), (2, 20), (4, 16), (8, 16), (16, 8)])
def test_plan_stays_within_the_actor_budget_and_places_every_voter_once(
    n, fan_out, max_reducers
):
    plan = plan_tree([None] * n, fan_out, max_reducers)
    assert plan.reducers <= max_reducers
    assert sorted(plan.order) == list(range(n))
    assert plan.offsets[0] == 0 and plan.offsets[-1] == n == plan.voters
    sizes = [b - a for a, b in zip(plan.offsets, plan.offsets[1:], strict=False)]
    assert max(sizes) - min(sizes) <= 1  # ungrouped voters are spread evenly
    leaves = len(plan.leaves)
    levels = math.ceil(math.log(leaves, fan_out) - 1e-9) if leaves > 1 else 0
    assert plan.actor_depth == 1 + levels
    for level in plan.levels:
        assert all(1 <= hi - lo <= fan_out for lo, hi in level)
    assert len(plan.levels[-1] if plan.levels else [0]) == 1  # one root


def test_ten_thousand_voters_fit_on_a_small_tree():
    plan = plan_tree([None] * 10_000, fan_out=8, max_reducers=16)
    assert 2 <= len(plan.leaves) and plan.reducers <= 16
    assert plan.reducers == len(plan.leaves) + internal_nodes(len(plan.leaves), 8)


def test_groups_stay_together_on_one_leaf():
    groups = [f"region-{i % 5}" for i in range(3_000)] + [None] * 500
    plan = plan_tree(groups, fan_out=2, max_reducers=7)
    where: dict[str, set[int]] = {}
    for j in range(len(plan.leaves)):
        for pos in plan.order[plan.offsets[j] : plan.offsets[j + 1]]:
            if groups[pos] is not None:
                where.setdefault(groups[pos], set()).add(j)
    assert len(where) == 5 and all(len(leaves) == 1 for leaves in where.values())
    named = {g for leaf in plan.leaves for g, _ in leaf if g}
    assert named == set(where)


def test_bad_tree_input_is_rejected():
    with pytest.raises(ConsensusError, match="voter set is empty"):
        plan_tree([], 8, 16)
    with pytest.raises(ConsensusError, match="fan_out must be >= 2"):
        plan_tree([None], 1, 16)


def test_decide_with_no_voters_is_rejected_before_touching_ray():
    with pytest.raises(ConsensusError, match="voter set is empty"):
        decide("anything?", voters=[])


def test_simulated_voter_opinion_is_fixed_per_question_and_follows_its_bias():
    q = Question("lunch?", ("pizza", "salad", "soup"))
    voters = make_voters(3_000, bias=0.7, seed=3)
    first = [v.opinion(q) for v in voters]
    assert first == [v.opinion(q) for v in voters]  # same answer every time it is asked
    assert 0.66 < first.count("pizza") / 3_000 < 0.74
    assert {"salad", "soup"} <= set(first)
    vote = asyncio.run(voters[0].vote(q))
    assert vote == Vote(first[0])


def test_make_voters_assigns_failures_by_share():
    voters = make_voters(1_000, dead_share=0.1, slow_share=0.1, error_share=0.05, seed=1)
    kinds = [v.failure for v in voters]
    assert kinds.count(Failure.DEAD) == 100 and kinds.count(Failure.SLOW) == 100
    assert kinds.count(Failure.ERROR) == 50

    async def failing():
        return await SimulatedVoter("x", failure=Failure.ERROR).vote(Question("q"))

    with pytest.raises(RuntimeError, match="failed to vote"):
        asyncio.run(failing())
