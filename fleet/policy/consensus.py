"""Consensus: tallies that merge up a tree, the decision rule, sequential sampling,
Snowball, tie-breaking and memoization. Pure: no Ray, no global randomness, and no clock
of its own (``DecisionMemo`` is given one).

The Ray reducer tree (``fleet.consensus``) and the tests drive the same objects (the
simulator does not model decisions). A decision is a *run* (``start_run``): the runtime
asks it which voters to poll next (``next_request``), feeds it the partial tallies that
come back (``observe``) and asks for a ``verdict`` after each reply (a streaming run) or
each round (a sampling run), with ``final=True`` once nothing more will arrive: the
deadline passed or there is no one left to ask.

The rule, shared by every mode: the leading option wins when at least ``quorum_share``
of the voters have answered and it holds more than ``majority_share`` of the measure in
hand (count, weight or weight x confidence). The reason recorded says what decided:

- ``quorum``: the rule holds and the outcome is final: every voter is accounted for, or
  the leader is *settled* (it keeps its majority even if every outstanding voter votes
  against it).
- ``confidence``: a sampling mode stopped early: the sequential test established the
  leader's majority at the configured confidence, or Snowball accepted its preference.
- ``timeout``: nothing more will arrive (deadline passed, or sampling exhausted its
  budget) and the votes in hand satisfy the rule.
- ``tie_break``: nothing more will arrive and the votes in hand do not satisfy the rule
  (a split, a tie, or too few answers for the quorum): the tie-breaker decides.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from fractions import Fraction
from typing import Any, Protocol

from fleet.policy.hashing import stable_hash64
from fleet.spec.consensus import ConsensusMode, ConsensusSpec, TieBreaker, WeighBy

# Weights and confidences are held as integers in millionths, so that summing tallies is
# exact and therefore associative and commutative: a tree of reducers, in any shape and
# in any arrival order, yields exactly the flat tally (floats would differ in the last bit).
WEIGHT_SCALE = 1_000_000
# A reducer gives its children this share of its own time budget less (capped), so that
# their replies reach it, and its reply its parent, before its deadline.
LEVEL_MARGIN_SHARE = 0.1
LEVEL_MARGIN_MAX_S = 0.2
ROOT_RESERVE_S = 0.05
MEMO_MAX_ENTRIES = 4_096
PROBE_GROWTH = 2  # each probabilistic batch doubles the sample
EMPTY_VOTERS = "voters: the voter set is empty; a decision needs at least one voter"
FAILED = "failed"  # per-voter outcome: the voter raised or returned an invalid vote
MISSING = "missing"  # per-voter outcome: no answer before the deadline


class ConsensusError(ValueError):
    """Bad input to a decision: an empty voter set, a malformed question or vote."""


class Reason(str, Enum):
    QUORUM = "quorum"
    CONFIDENCE = "confidence"
    TIMEOUT = "timeout"
    TIE_BREAK = "tie_break"


def _units(x: float) -> int:
    return round(x * WEIGHT_SCALE)


# -- questions and votes ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Question:
    """What is being decided. ``options`` is optional: voters may answer freely."""

    text: str
    options: tuple[str, ...] = ()
    key: str = field(init=False, compare=False, repr=False)
    """Identity of the question: identical text and options give the same key."""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ConsensusError(
                f"question: text must be a non-empty string, got {self.text!r}"
            )
        opts = tuple(self.options)
        if any(not isinstance(o, str) or not o for o in opts) or len(set(opts)) != len(opts):
            raise ConsensusError(
                f"question.options must be distinct non-empty strings, got {list(opts)!r}"
            )
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "key", f"{stable_hash64(self.text, *opts):016x}")

    @classmethod
    def of(cls, q: Question | str) -> Question:
        return q if isinstance(q, Question) else cls(q)


@dataclass(frozen=True, slots=True)
class Vote:
    """One voter's answer: an option, its weight (>= 0) and its confidence in [0, 1]."""

    option: str
    weight: float = 1.0
    confidence: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.option, str) or not self.option:
            raise ConsensusError(
                f"vote: option must be a non-empty string, got {self.option!r}"
            )
        if not (
            isinstance(self.weight, int | float)
            and math.isfinite(self.weight)
            and self.weight >= 0
        ):
            raise ConsensusError(
                f"vote: weight must be a finite number >= 0, got {self.weight!r}"
            )
        if not (isinstance(self.confidence, int | float) and 0 <= self.confidence <= 1):
            raise ConsensusError(
                f"vote: confidence must lie within [0, 1], got {self.confidence!r}"
            )


def as_vote(answer: Any) -> Vote:
    """Normalise what a voter returned: a Vote, an option string, a tuple or a mapping."""
    if isinstance(answer, Vote):
        return answer
    if isinstance(answer, str):
        return Vote(answer)
    if isinstance(answer, tuple | list):
        return Vote(*answer)
    if isinstance(answer, Mapping):
        return Vote(**answer)
    raise ConsensusError(
        f"vote: expected an option, a Vote, a tuple or a mapping, got {answer!r}"
    )


# -- tallies ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Tally:
    """Votes per option, with how many voters were asked and how many failed.

    ``eligible`` voters were asked; ``answered`` gave a valid vote, ``failed`` raised or
    answered garbage, and the rest (``missing``) did not answer in time. Merging is
    exact integer addition, so it is associative and commutative with ``Tally()`` as its
    identity: any reduction tree gives the flat tally.
    """

    counts: dict[str, int] = field(default_factory=dict)
    weights_u: dict[str, int] = field(default_factory=dict)  # sum of weights, millionths
    scores_u: dict[str, int] = field(default_factory=dict)  # sum of weight x confidence
    eligible: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        if self.failed < 0 or self.answered + self.failed > self.eligible:
            raise ConsensusError(
                f"tally: answered ({self.answered}) + failed ({self.failed}) exceeds the "
                f"voters asked ({self.eligible})"
            )

    @classmethod
    def of(
        cls, votes: Iterable[Vote], *, eligible: int | None = None, failed: int = 0
    ) -> Tally:
        """Tally ``votes``; ``eligible`` defaults to the voters that answered or failed."""
        counts: dict[str, int] = {}
        weights: dict[str, int] = {}
        scores: dict[str, int] = {}
        for v in votes:
            o = v.option
            counts[o] = counts.get(o, 0) + 1
            weights[o] = weights.get(o, 0) + _units(v.weight)
            scores[o] = scores.get(o, 0) + _units(v.weight * v.confidence)
        n = sum(counts.values())
        return cls(
            counts, weights, scores, n + failed if eligible is None else eligible, failed
        )

    @classmethod
    def of_outcomes(cls, outcomes: Iterable[Vote | str]) -> Tally:
        """Tally per-voter outcomes: a Vote, ``FAILED`` or ``MISSING``."""
        outcomes = list(outcomes)
        failed = sum(1 for o in outcomes if o == FAILED)
        return cls.of(
            (o for o in outcomes if isinstance(o, Vote)), eligible=len(outcomes), failed=failed
        )

    def merge(self, other: Tally) -> Tally:
        def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            out = dict(a)
            for k, v in b.items():
                out[k] = out.get(k, 0) + v
            return out

        return Tally(
            add(self.counts, other.counts),
            add(self.weights_u, other.weights_u),
            add(self.scores_u, other.scores_u),
            self.eligible + other.eligible,
            self.failed + other.failed,
        )

    __add__ = merge

    @staticmethod
    def combine(tallies: Iterable[Tally]) -> Tally:
        out = Tally()
        for t in tallies:
            out = out.merge(t)
        return out

    @property
    def answered(self) -> int:
        return sum(self.counts.values())

    @property
    def missing(self) -> int:
        return self.eligible - self.answered - self.failed

    def measure(self, by: WeighBy = WeighBy.COUNT) -> dict[str, int]:
        return {
            WeighBy.COUNT: self.counts,
            WeighBy.WEIGHT: self.weights_u,
            WeighBy.CONFIDENCE: self.scores_u,
        }[WeighBy(by)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "weights": {k: v / WEIGHT_SCALE for k, v in sorted(self.weights_u.items())},
            "scores": {k: v / WEIGHT_SCALE for k, v in sorted(self.scores_u.items())},
            "eligible": self.eligible,
            "answered": self.answered,
            "failed": self.failed,
            "missing": self.missing,
        }


def reduce_tree(tallies: Sequence[Tally], fan_out: int) -> tuple[Tally, int, int]:
    """Merge ``tallies`` ``fan_out`` at a time, level by level, into one.

    Returns (tally, partial tallies passed up, levels). This is what group leaders do
    inside a leaf reducer; the result equals ``Tally.combine`` because merging is exact.
    """
    if fan_out < 2:
        raise ConsensusError(f"fan_out must be >= 2, got {fan_out}")
    level = list(tallies)
    if not level:
        return Tally(), 0, 0
    passed = levels = 0
    while len(level) > 1:
        passed += len(level)
        level = [Tally.combine(level[i : i + fan_out]) for i in range(0, len(level), fan_out)]
        levels += 1
    return level[0], passed, levels


def tally_groups(
    groups: Sequence[Sequence[Vote | str]], fan_out: int
) -> tuple[Tally, int, int]:
    """Tally the per-voter outcomes of a leaf's groups (departments, regions, chunks).

    Within a group, a group leader tallies each run of ``fan_out`` voters and the group's
    partial tallies are merged ``fan_out`` at a time; the leaf then merges its groups the
    same way. Returns (tally, messages, depth): messages count one per vote asked plus
    one per partial tally passed up; depth counts the hops from a vote to the leaf tally.
    """
    group_tallies, messages, depth = [], 0, 0
    for outcomes in groups:
        if not outcomes:
            continue
        chunks = [
            Tally.of_outcomes(outcomes[i : i + fan_out])
            for i in range(0, len(outcomes), fan_out)
        ]
        t, passed, levels = reduce_tree(chunks, fan_out)
        group_tallies.append(t)
        messages += len(outcomes) + passed
        depth = max(depth, 1 + levels)
    t, passed, levels = reduce_tree(group_tallies, fan_out)
    return t, messages + passed, depth + levels


# -- the rule -----------------------------------------------------------------------------
def _ratio(x: float) -> tuple[int, int]:
    f = Fraction(x).limit_denominator(10**6)
    return f.numerator, f.denominator


def quorum_needed(quorum_share: float, population: int) -> int:
    """Answers needed for a quorum: ceil(quorum_share x population), computed exactly."""
    num, den = _ratio(quorum_share)
    return -(-num * population // den)


def leader_of(measure: Mapping[str, int]) -> str | None:
    """The option with the most; an exact tie goes to the smallest name (deterministic)."""
    best = min(((-v, o) for o, v in measure.items() if v > 0), default=None)
    return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class RuleCheck:
    """How the votes in hand stand against the rule, for a population of voters."""

    leader: str | None
    leader_measure: int
    total_measure: int
    quorum_met: bool
    majority: bool
    settled: bool  # the leader keeps its majority whatever the outstanding voters say

    @property
    def holds(self) -> bool:
        return self.quorum_met and self.majority

    @property
    def share(self) -> float:
        return self.leader_measure / self.total_measure if self.total_measure else 0.0


def check_rule(
    tally: Tally, policy: ConsensusSpec, population: int | None = None
) -> RuleCheck:
    """Evaluate the rule on ``tally``; ``population`` is every voter of the question."""
    population = tally.eligible if population is None else population
    m = tally.measure(policy.weigh_by)
    leader = leader_of(m)
    total = sum(m.values())
    lead = m.get(leader, 0) if leader is not None else 0
    num, den = _ratio(policy.majority_share)
    majority = leader is not None and lead * den > num * total
    quorum_met = population > 0 and tally.answered >= quorum_needed(
        policy.quorum_share, population
    )
    outstanding = max(0, population - tally.answered - tally.failed)
    if policy.weigh_by is WeighBy.COUNT:
        # Worst case for the leader: every outstanding voter votes for someone else.
        settled = quorum_met and lead * den > num * (total + outstanding)
    else:  # the weight an outstanding voter would bring is unknown
        settled = quorum_met and majority and outstanding == 0
    return RuleCheck(leader, lead, total, quorum_met, majority, settled)


def tie_break(tally: Tally, policy: ConsensusSpec, question: Question) -> str | None:
    """The designated tie-breaker's choice; deterministic for a given tally and question.

    ``option`` always picks ``tie_break_option``. ``lexicographic`` and ``seeded`` pick
    among the options leading the votes in hand (or, with no votes, the question's
    options): the smallest name, or one chosen by a hash of (seed, question). With
    nothing to choose from (no votes and no options), ``tie_break_option``: None unless
    the policy sets one.
    """
    if policy.tie_breaker is TieBreaker.OPTION:
        return policy.tie_break_option
    m = tally.measure(policy.weigh_by)
    top = max(m.values(), default=0)
    cands = sorted(o for o, v in m.items() if v == top and v > 0) or sorted(question.options)
    if not cands:
        return policy.tie_break_option
    if policy.tie_breaker is TieBreaker.LEXICOGRAPHIC:
        return cands[0]
    return cands[stable_hash64(policy.seed, question.key) % len(cands)]


# -- finite-population significance -----------------------------------------------------
def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def majority_p_value(
    successes: int, sampled: int, population: int, majority_share: float = 0.5
) -> float:
    """P(X >= successes) when ``sampled`` voters are drawn without replacement from
    ``population`` of whom at most ``floor(majority_share x population)`` back the option.

    This is the p-value of "the option does NOT hold a majority": the hypergeometric
    upper tail is increasing in the number of supporters, so the largest number allowed
    under the null (M below) is the least favourable case and bounds every other one.
    Exact for sampling without replacement (no normal approximation).
    """
    n, N = sampled, population
    if n <= 0 or N <= 0:
        return 1.0
    num, den = _ratio(majority_share)
    M = num * N // den
    n = min(n, N)
    if successes > min(n, M):
        return 0.0
    lo = max(0, n - (N - M))
    if successes <= lo:
        return 1.0
    mode = (n + 1) * (M + 1) // (N + 2)

    def pmf(k: int) -> float:
        return math.exp(_log_comb(M, k) + _log_comb(N - M, n - k) - _log_comb(N, n))

    # Sum away from the mode so the first term is the largest one (no underflow trap).
    if successes > mode:  # upper tail, terms decrease as k grows
        k, term = successes, pmf(successes)
        total = term
        while k < min(n, M) and term > total * 1e-17:
            term *= (M - k) * (n - k) / ((k + 1) * (N - M - n + k + 1))
            k += 1
            total += term
        return min(1.0, total)
    k = successes - 1  # 1 - lower tail, terms decrease as k falls
    term = pmf(k)
    total = term
    while k > lo and term > total * 1e-17:
        term *= k * (N - M - n + k) / ((M - k + 1) * (n - k + 1))
        k -= 1
        total += term
    return max(0.0, 1.0 - total)


def majority_confidence(
    tally: Tally, option: str | None, policy: ConsensusSpec, population: int
) -> float:
    """1 - the p-value of "``option`` does NOT hold a majority (by count)" over the
    population less the voters that failed (those that have not answered yet count in),
    treating the answers in hand as a uniform sample of it (a caveat when stragglers are
    biased)."""
    if option is None:
        return 0.0
    responsive = population - tally.failed
    return 1.0 - majority_p_value(
        tally.counts.get(option, 0), tally.answered, responsive, policy.majority_share
    )


# -- verdicts and decisions -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verdict:
    option: str | None
    reason: Reason
    confidence: float
    share: float  # the option's share of the measure in hand


def evaluate(
    tally: Tally,
    policy: ConsensusSpec,
    question: Question,
    *,
    population: int,
    final: bool,
    test: Callable[[RuleCheck], Verdict | None] | None = None,
) -> Verdict | None:
    """Apply the rule; None means "undecided: keep collecting".

    ``final`` says no more votes will arrive. ``test`` is a mode's early-stop test (a
    sequential test, Snowball), consulted only when the exact rule has not settled it.
    """
    chk = check_rule(tally, policy, population)
    outstanding = population - tally.answered - tally.failed
    if chk.holds and (outstanding <= 0 or chk.settled):
        return Verdict(chk.leader, Reason.QUORUM, 1.0, chk.share)
    if outstanding <= 0 and not chk.holds:
        final = True  # everyone is accounted for and the rule fails: nothing to wait for
    if test is not None and not (final and outstanding <= 0):
        v = test(chk)
        if v is not None:
            return v
    if not final:
        return None
    if chk.holds:
        return Verdict(
            chk.leader,
            Reason.TIMEOUT,
            majority_confidence(tally, chk.leader, policy, population),
            chk.share,
        )
    option = tie_break(tally, policy, question)
    m = tally.measure(policy.weigh_by)
    total = sum(m.values())
    share = m.get(option, 0) / total if total and option is not None else 0.0
    return Verdict(
        option, Reason.TIE_BREAK, majority_confidence(tally, option, policy, population), share
    )


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one decision, with what decided it and what it cost.

    ``elapsed_s`` runs from the start of the decision to the verdict (at the root
    reducer); ``messages`` counts votes asked, partial tallies passed up and requests
    sent down; ``depth`` is the longest hop count from a vote to the root's tally.
    ``cached`` decisions come from the memo; ``age_s`` is how old they are.
    """

    question: Question
    option: str | None
    reason: Reason
    tally: Tally
    confidence: float
    share: float
    mode: str
    voters: int
    messages: int = 0
    depth: int = 0
    rounds: int = 0
    elapsed_s: float = 0.0
    timeout_s: float = 0.0
    cached: bool = False
    age_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["question"] = {"text": self.question.text, "options": list(self.question.options)}
        d["reason"] = self.reason.value
        d["tally"] = self.tally.to_dict()
        return d


# -- runs: one per decision -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """Whom to ask next: global voter indices (None = every voter), and how long this
    round may wait for them (None = until the decision's deadline)."""

    voters: tuple[int, ...] | None
    budget_s: float | None = None


class Run(Protocol):
    streams: bool  # True: a verdict may be asked after each partial reply, not per round
    population: int
    rounds: int

    def next_request(self) -> Request | None: ...
    def observe(self, tally: Tally, votes: Mapping[int, Vote] | None = None) -> None: ...
    def verdict(self, final: bool) -> Verdict | None: ...
    @property
    def tally(self) -> Tally: ...


class HierarchicalRun:
    """Ask every voter once; partial tallies stream in from the subtrees.

    Before every subtree has replied, a verdict comes only when the leader is settled
    (rule ``quorum``: the rest cannot change the outcome) or at the deadline
    (``final=True``: the votes in hand decide, or the tie-breaker).
    """

    streams = True

    def __init__(self, policy: ConsensusSpec, question: Question, population: int):
        self.policy, self.question, self.population = policy, question, population
        self._tally = Tally()
        self._asked = False
        self.rounds = 0

    @property
    def tally(self) -> Tally:
        return self._tally

    def next_request(self) -> Request | None:
        if self._asked:
            return None
        self._asked = True
        self.rounds = 1
        return Request(None, None)

    def observe(self, tally: Tally, votes: Mapping[int, Vote] | None = None) -> None:
        self._tally = self._tally.merge(tally)

    def verdict(self, final: bool) -> Verdict | None:
        return evaluate(
            self._tally, self.policy, self.question, population=self.population, final=final
        )


class _Draw:
    """Uniform sampling without replacement, lazily (a partial Fisher-Yates shuffle)."""

    def __init__(self, population: int, rng: random.Random):
        self._rng = rng
        self._pool = list(range(population))
        self.drawn = 0

    def take(self, k: int) -> list[int]:
        pool, n = self._pool, len(self._pool)
        out = []
        for _ in range(min(k, n - self.drawn)):
            j = self._rng.randrange(self.drawn, n)
            pool[self.drawn], pool[j] = pool[j], pool[self.drawn]
            out.append(pool[self.drawn])
            self.drawn += 1
        return out


class ProbabilisticRun:
    """Sample voters in doubling batches until the leader's majority is established.

    Test: after each batch (look k = 1, 2, ...), the leader L is accepted when
    P(X >= x | L has at most floor(majority_share x N) supporters) <= alpha_k with
    alpha_k = alpha / (K k (k + 1)), alpha = 1 - confidence, X hypergeometric (sampling
    without replacement from the N responsive voters), K the number of options.

    Why the error is at most alpha: a wrong acceptance at look k needs some option
    without a majority to pass its test there, which has probability <= alpha_k for each
    of the K options (the hypergeometric tail is largest at the null's boundary). A union
    bound over options and looks gives sum_k K alpha_k = alpha sum_k 1/(k(k+1)) <= alpha,
    however many looks are taken (peeking is paid for). Voters that fail or time out are
    dropped from N: the majority tested is one of the voters that answer. That is not
    conservative (a smaller N lightens the tail: the finite-population correction) and
    assumes the voters that dropped out would have voted like the rest. Only with
    ``question.options`` given is K fixed in advance; otherwise K is the number of
    options seen so far (at least 2), a heuristic for free-form answers.
    """

    streams = False

    def __init__(
        self, policy: ConsensusSpec, question: Question, population: int, rng: random.Random
    ):
        self.policy, self.question, self.population = policy, question, population
        self._draw = _Draw(population, rng)
        self._next_total = policy.first_sample
        self._tally = Tally()
        self._fresh = False
        self.looks = 0
        self.rounds = 0

    @property
    def tally(self) -> Tally:
        return self._tally

    def next_request(self) -> Request | None:
        want = min(self._next_total, self.population) - self._draw.drawn
        if want <= 0:
            return None
        self._next_total *= PROBE_GROWTH
        self.rounds += 1
        return Request(tuple(self._draw.take(want)), self.policy.round_timeout_s)

    def observe(self, tally: Tally, votes: Mapping[int, Vote] | None = None) -> None:
        self._tally = self._tally.merge(tally)
        self._fresh = True

    def _test(self, chk: RuleCheck) -> Verdict | None:
        if not self._fresh or chk.leader is None:
            return None
        self._fresh = False
        self.looks += 1
        k, t = self.looks, self._tally
        n_options = max(2, len(self.question.options) or len(t.counts))
        alpha_k = (1.0 - self.policy.confidence) / (n_options * k * (k + 1))
        responsive = self.population - t.failed - t.missing
        p = majority_p_value(
            t.counts[chk.leader], t.answered, responsive, self.policy.majority_share
        )
        if p <= alpha_k:
            return Verdict(chk.leader, Reason.CONFIDENCE, 1.0 - p, chk.share)
        return None

    def verdict(self, final: bool) -> Verdict | None:
        return evaluate(
            self._tally,
            self.policy,
            self.question,
            population=self.population,
            final=final,
            test=self._test,
        )


class SnowballRun:
    """Snowball (Avalanche family) run by one decider over fixed opinions.

    Each round polls ``k`` distinct voters at random. If at least ``threshold x k`` of
    them name one option, that option's strength grows by one; the preference is the
    strongest option so far; ``rounds`` consecutive successful rounds for the same option
    accept the preference. A round without such a quorum resets the streak. With a true
    60/40 split, k = 20 and a threshold of 0.55 (11 of 20), a round favours the majority
    with probability ~0.76 and the minority with ~0.13, so a wrong acceptance needs
    ``rounds`` (default 6) minority rounds in a row (0.128^6, ~4e-6, per window).
    The exact rule still applies to the union of votes seen (and is final when settled).
    """

    streams = False

    def __init__(
        self, policy: ConsensusSpec, question: Question, population: int, rng: random.Random
    ):
        self.policy, self.question, self.population = policy, question, population
        self._rng = rng
        self.k = min(policy.snowball_sample_size, population)
        self.need = math.ceil(policy.snowball_threshold * self.k - 1e-9)
        self.strength: dict[str, int] = {}
        self.preference: str | None = None
        self.last: str | None = None
        self.streak = 0
        self.rounds = 0
        self._round = Tally()
        self._fresh = False
        self._answers: dict[int, Vote] = {}
        self._asked: set[int] = set()

    @property
    def tally(self) -> Tally:
        """Unique votes seen so far (a voter polled twice counts once)."""
        return Tally.of(self._answers.values(), eligible=len(self._asked))

    def next_request(self) -> Request | None:
        if self.rounds >= self.policy.snowball_max_rounds or self.k == 0:
            return None
        self.rounds += 1
        picks = tuple(self._rng.sample(range(self.population), self.k))
        self._asked.update(picks)
        return Request(picks, self.policy.round_timeout_s)

    def observe(self, tally: Tally, votes: Mapping[int, Vote] | None = None) -> None:
        self._round = self._round.merge(tally)
        self._answers.update(votes or {})
        self._fresh = True

    def _test(self, chk: RuleCheck) -> Verdict | None:
        if not self._fresh:
            return None
        self._fresh, rnd, self._round = False, self._round, Tally()
        top = leader_of(rnd.counts)
        if top is None or rnd.counts[top] < self.need:
            self.streak = 0
            return None
        self.strength[top] = self.strength.get(top, 0) + 1
        if self.preference is None or self.strength[top] > self.strength[self.preference]:
            self.preference = top
        self.streak = self.streak + 1 if top == self.last else 1
        self.last = top
        if self.streak < self.policy.snowball_rounds:
            return None
        t = self.tally
        share = t.counts.get(self.preference, 0) / t.answered if t.answered else 0.0
        return Verdict(
            self.preference,
            Reason.CONFIDENCE,
            majority_confidence(t, self.preference, self.policy, self.population),
            share,
        )

    def verdict(self, final: bool) -> Verdict | None:
        return evaluate(
            self.tally,
            self.policy,
            self.question,
            population=self.population,
            final=final,
            test=self._test,
        )


def seeded_rng(policy: ConsensusSpec, question: Question) -> random.Random:
    """The sampling rng of a decision: seeded by (``policy.seed``, question), so the same
    question under the same policy samples the same voters, in any process."""
    return random.Random(stable_hash64(policy.seed, question.key))


def start_run(
    policy: ConsensusSpec,
    question: Question,
    population: int,
    rng: random.Random,
) -> HierarchicalRun | ProbabilisticRun | SnowballRun:
    """A fresh run for one decision; ``rng`` draws the voters a sampling mode polls
    (``seeded_rng`` for the runtime's reproducible choice)."""
    if population <= 0:
        raise ConsensusError(EMPTY_VOTERS)
    if policy.mode is ConsensusMode.HIERARCHICAL:
        return HierarchicalRun(policy, question, population)
    if policy.mode is ConsensusMode.PROBABILISTIC:
        return ProbabilisticRun(policy, question, population, rng)
    return SnowballRun(policy, question, population, rng)


def run_sync(run: Run, ask: Callable[[Request], tuple[Tally, Mapping[int, Vote]]]) -> Verdict:
    """Drive a run to its verdict with a synchronous ``ask`` (tests).

    The live runtime (``fleet.consensus.reducer``) does the same with Ray calls and a
    deadline.
    """
    while True:
        v = run.verdict(final=False)
        if v is not None:
            return v
        req = run.next_request()
        if req is None:
            return run.verdict(final=True)  # type: ignore[return-value]
        tally, votes = ask(req)
        run.observe(tally, votes)


def child_budget_s(budget_s: float) -> float:
    """How long a reducer's children may take so their replies beat its own deadline.

    Each level keeps a margin (LEVEL_MARGIN_SHARE of its budget, at most
    LEVEL_MARGIN_MAX_S): half for the replies' trip up, half for its own reduction and
    reply. So deadlines nest, leaf < parent < ... < root <= the decision's deadline, and
    a slow or dead voter costs at most its leaf's budget, never the decision's.
    """
    return max(0.0, budget_s - min(LEVEL_MARGIN_SHARE * budget_s, LEVEL_MARGIN_MAX_S))


def root_reserve_s(timeout_s: float) -> float:
    """Time the root keeps back from its last round to compute the verdict and reply:
    ROOT_RESERVE_S, or a tenth of a very short timeout."""
    return min(ROOT_RESERVE_S, 0.1 * timeout_s)


def wait_budget_s(budget_s: float) -> float:
    """How long a reducer with ``budget_s`` waits for what is below it: halfway into its
    margin (see ``child_budget_s``)."""
    return (budget_s + child_budget_s(budget_s)) / 2


# -- memoization --------------------------------------------------------------------------
def memo_key(question: Question, policy: ConsensusSpec, scope: str = "") -> str:
    """Identical question, same deciding policy (and scope, e.g. the electorate) -> same key.

    ``memo_ttl_s`` is left out: it says how long to keep an answer, not how to reach it.
    """
    rule = policy.model_dump(mode="json", exclude={"memo_ttl_s"})
    blob = json.dumps([question.text, list(question.options), rule, scope], sort_keys=True)
    return f"{stable_hash64(blob):016x}"


class DecisionMemo:
    """Recent decisions by key, each kept for its TTL; ``clock`` gives seconds."""

    def __init__(self, clock: Callable[[], float], max_entries: int = MEMO_MAX_ENTRIES):
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[Decision, float, float]] = {}  # key -> (d, at, ttl)

    def get(self, key: str) -> Decision | None:
        """The cached decision (``cached=True``, ``age_s`` set) if younger than its TTL."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        decision, at, ttl = entry
        age = self._clock() - at
        if age >= ttl:
            del self._entries[key]
            return None
        return replace(decision, cached=True, age_s=age)

    def put(self, key: str, decision: Decision, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        self._entries.pop(key, None)
        if len(self._entries) >= self._max:  # drop the oldest insertion (dicts keep order)
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (decision, self._clock(), ttl_s)

    def invalidate(self, key: str | None = None) -> int:
        """Forget one key, or everything when ``key`` is None; returns how many went."""
        if key is None:
            n = len(self._entries)
            self._entries.clear()
            return n
        return 1 if self._entries.pop(key, None) is not None else 0

    def __len__(self) -> int:
        return len(self._entries)
