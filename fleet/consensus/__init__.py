"""Fleet-wide decisions at scale: a tree of Ray reducer actors hosting the voters.

The decision logic is pure and lives in ``fleet.policy.consensus``; this package is the
runtime around it (``Electorate``, ``decide``) plus a simulated voter.
"""

from fleet.consensus.electorate import Electorate, as_policy, decide
from fleet.consensus.tree import TreePlan, plan_tree
from fleet.consensus.voters import Failure, SimulatedVoter, Voter, make_voters
from fleet.policy.consensus import (
    ConsensusError,
    Decision,
    DecisionMemo,
    Question,
    Reason,
    Tally,
    Vote,
)
from fleet.spec.consensus import ConsensusMode, ConsensusSpec, TieBreaker, WeighBy

__all__ = [
    "ConsensusError",
    "ConsensusMode",
    "ConsensusSpec",
    "Decision",
    "DecisionMemo",
    "Electorate",
    "Failure",
    "Question",
    "Reason",
    "SimulatedVoter",
    "Tally",
    "TieBreaker",
    "TreePlan",
    "Vote",
    "Voter",
    "WeighBy",
    "as_policy",
    "decide",
    "make_voters",
    "plan_tree",
]
