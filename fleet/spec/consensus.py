"""Consensus section: how fleet-wide decisions are reached, how long they may take, and
how long an answer is reused.

Three modes share one rule (see ``fleet.policy.consensus``):

- ``hierarchical``: every voter is asked; a tree of reducers with ``fan_out`` children
  merges partial tallies. Exact.
- ``probabilistic``: voters are sampled in growing batches until a sequential test says
  the leader holds a majority at ``confidence`` (or the population is exhausted).
- ``snowball``: repeated small samples of ``snowball_sample_size`` voters; the decider
  accepts its preference after ``snowball_rounds`` consecutive rounds in which at least
  ``snowball_threshold`` of the sample agreed (the Snowball protocol of the Avalanche
  family, run by one decider over fixed opinions).
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field, field_validator, model_validator

from fleet.spec._base import SpecModel

DEFAULT_FAN_OUT = 8
DEFAULT_CONFIDENCE = 0.95
DEFAULT_QUORUM_SHARE = 0.5
DEFAULT_MAJORITY_SHARE = 0.5
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_ROUND_TIMEOUT_S = 0.25
DEFAULT_MEMO_TTL_S = 60.0
DEFAULT_MAX_REDUCERS = 16
DEFAULT_FIRST_SAMPLE = 32
DEFAULT_SNOWBALL_SAMPLE_SIZE = 20
DEFAULT_SNOWBALL_THRESHOLD = 0.55
DEFAULT_SNOWBALL_ROUNDS = 6
DEFAULT_SNOWBALL_MAX_ROUNDS = 200


class ConsensusMode(str, Enum):
    HIERARCHICAL = "hierarchical"
    PROBABILISTIC = "probabilistic"
    SNOWBALL = "snowball"


class TieBreaker(str, Enum):
    LEXICOGRAPHIC = "lexicographic"  # plurality in hand, ties to the smallest option name
    SEEDED = "seeded"  # plurality in hand, ties by a hash of (seed, question)
    OPTION = "option"  # always ``tie_break_option`` (e.g. the status quo, or "escalate")


class WeighBy(str, Enum):
    COUNT = "count"  # one voter, one vote
    WEIGHT = "weight"  # each vote counts its weight
    CONFIDENCE = "confidence"  # each vote counts weight x the voter's stated confidence


class ConsensusSpec(SpecModel):
    """How fleet-wide decisions are made.

    The rule: the leading option wins when at least ``quorum_share`` of the voters have
    answered and it holds more than ``majority_share`` of the measure (``weigh_by``) in
    hand. ``timeout_s`` is the whole decision's deadline: at the deadline the votes in
    hand decide if they satisfy the rule, otherwise the ``tie_breaker`` decides. A
    decision is reused for an identical question (and policy) for ``memo_ttl_s`` seconds
    (0 disables memoization). ``max_reducers`` caps the Ray actors of one reducer tree:
    each leaf hosts many voters.
    """

    mode: ConsensusMode = ConsensusMode.HIERARCHICAL
    fan_out: int = DEFAULT_FAN_OUT
    confidence: float = DEFAULT_CONFIDENCE
    quorum_share: float = Field(default=DEFAULT_QUORUM_SHARE, gt=0, le=1)
    majority_share: float = Field(default=DEFAULT_MAJORITY_SHARE, ge=0.5, lt=1)
    weigh_by: WeighBy = WeighBy.COUNT
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    round_timeout_s: float = Field(default=DEFAULT_ROUND_TIMEOUT_S, gt=0)
    """Sampling modes: how long one round waits for the voters it asked."""
    tie_breaker: TieBreaker = TieBreaker.LEXICOGRAPHIC
    tie_break_option: str | None = Field(default=None, min_length=1)
    seed: int = 0
    """Seeds the sampling order and the ``seeded`` tie-breaker (mixed with the question)."""
    memo_ttl_s: float = Field(default=DEFAULT_MEMO_TTL_S, ge=0)
    max_reducers: int = Field(default=DEFAULT_MAX_REDUCERS, ge=1)
    first_sample: int = Field(default=DEFAULT_FIRST_SAMPLE, ge=1)
    """Probabilistic mode: voters in the first batch; each later batch doubles the sample."""
    snowball_sample_size: int = Field(default=DEFAULT_SNOWBALL_SAMPLE_SIZE, ge=1)
    snowball_threshold: float = Field(default=DEFAULT_SNOWBALL_THRESHOLD, gt=0.5, le=1)
    snowball_rounds: int = Field(default=DEFAULT_SNOWBALL_ROUNDS, ge=1)
    snowball_max_rounds: int = Field(default=DEFAULT_SNOWBALL_MAX_ROUNDS, ge=1)

    @field_validator("fan_out")
    @classmethod
    def _check_fan_out(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"fan_out must be >= 2 (a reducer tree needs at least two children per "
                f"reducer), got {v}"
            )
        return v

    @field_validator("confidence")
    @classmethod
    def _check_confidence(cls, v: float) -> float:
        if not 0.5 < v < 1:
            raise ValueError(
                f"confidence must lie strictly between 0.5 and 1 (e.g. 0.95), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> ConsensusSpec:
        if self.tie_breaker is TieBreaker.OPTION and self.tie_break_option is None:
            raise ValueError(
                "tie_breaker 'option' needs tie_break_option (the option to pick)"
            )
        if self.mode is not ConsensusMode.HIERARCHICAL and self.weigh_by is not WeighBy.COUNT:
            raise ValueError(
                f"weigh_by {self.weigh_by.value!r} needs mode 'hierarchical': the sampling "
                f"modes ({self.mode.value!r}) test a count of voters, not weights"
            )
        return self
