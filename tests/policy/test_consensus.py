"""Consensus policy: tallies, the rule, tie-breaking, sequential sampling, Snowball, memo.

Pure: no Ray. Runs are driven with ``run_sync`` over in-memory populations, exactly as
the reducer tree drives them over Ray.
"""

from __future__ import annotations

import itertools
import random
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleet.policy.consensus import (
    FAILED,
    MISSING,
    ConsensusError,
    Decision,
    DecisionMemo,
    HierarchicalRun,
    Question,
    Reason,
    Tally,
    Vote,
    as_vote,
    check_rule,
    child_budget_s,
    evaluate,
    majority_p_value,
    memo_key,
    reduce_tree,
    run_sync,
    seeded_rng,
    start_run,
    tally_groups,
    tie_break,
    wait_budget_s,
)
from fleet.spec.consensus import ConsensusSpec
from tests.utils import FakeClock

Q = Question("ship it?", ("no", "yes"))


def _run(policy: ConsensusSpec, question: Question, population: int):
    """A run with the runtime's rng: seeded by (seed, question)."""
    return start_run(policy, question, population, seeded_rng(policy, question))


def votes(**counts: int) -> list[Vote]:
    return [Vote(opt) for opt, n in counts.items() for _ in range(n)]


def final(tally: Tally, policy: ConsensusSpec | None = None, population: int | None = None):
    policy = policy or ConsensusSpec()
    return evaluate(tally, policy, Q, population=population or tally.eligible, final=True)


# -- tallies ------------------------------------------------------------------------------
vote_st = st.builds(
    Vote,
    option=st.sampled_from(["a", "b", "c"]),
    weight=st.floats(0, 10, allow_nan=False),
    confidence=st.floats(0, 1),
)


@st.composite
def partitioned(draw):
    """Votes, and a random tree over them (nested lists of arbitrary fan-out)."""
    vs = draw(st.lists(vote_st, max_size=60))

    def split(items, depth):
        if len(items) <= 1 or depth > 4 or draw(st.booleans()):
            return items
        cuts = sorted(draw(st.lists(st.integers(0, len(items)), max_size=4)))
        bounds = [0, *cuts, len(items)]
        return [split(items[a:b], depth + 1) for a, b in itertools.pairwise(bounds)]

    return vs, split(vs, 0)


def _reduce(node) -> Tally:
    if node and all(isinstance(x, Vote) for x in node):
        return Tally.of(node)
    return Tally.combine(_reduce(x) if isinstance(x, list) else Tally.of([x]) for x in node)


@settings(max_examples=150, deadline=None)
@given(partitioned(), st.randoms(use_true_random=False))
def test_any_reduction_tree_gives_the_flat_tally(case, rnd):
    vs, tree = case
    flat = Tally.of(vs)
    assert _reduce(tree) == flat
    shuffled = vs[:]
    rnd.shuffle(shuffled)
    assert Tally.of(shuffled) == flat  # order of arrival does not matter
    singles = [Tally.of([v]) for v in vs]
    for fan_out in (2, 3, 8):
        assert reduce_tree(singles, fan_out)[0] == flat
    assert flat.merge(Tally()) == flat and Tally().merge(flat) == flat


def test_tally_counts_weights_and_confidence_weighted_scores():
    t = Tally.of([Vote("a", 2.0, 0.5), Vote("a", 1.0, 1.0), Vote("b", 0.5, 1.0)])
    assert t.counts == {"a": 2, "b": 1}
    assert t.to_dict()["weights"] == {"a": 3.0, "b": 0.5}
    assert t.to_dict()["scores"] == {"a": 2.0, "b": 0.5}
    assert (t.eligible, t.answered, t.failed, t.missing) == (3, 3, 0, 0)


def test_outcomes_count_failed_and_missing_voters():
    t = Tally.of_outcomes([Vote("a"), FAILED, MISSING, Vote("b"), MISSING])
    assert (t.eligible, t.answered, t.failed, t.missing) == (5, 2, 1, 2)
    with pytest.raises(ConsensusError, match="exceeds the voters asked"):
        Tally({"a": 3}, {"a": 3}, {"a": 3}, eligible=2)


@pytest.mark.parametrize("n,fan_out", [(1, 2), (7, 2), (64, 8), (1000, 8), (1000, 3)])
def test_group_leaders_reduce_in_log_depth_with_linear_messages(n, fan_out):
    outcomes = [Vote("a" if i % 3 else "b") for i in range(n)]
    groups = [outcomes[: n // 2], outcomes[n // 2 :]]
    t, messages, depth = tally_groups(groups, fan_out)
    assert t == Tally.of(outcomes)
    assert n <= messages <= n + 2 * n // (fan_out - 1) + 4  # votes + partials passed up: O(n)
    levels = 0
    while fan_out**levels < n:
        levels += 1
    assert depth <= levels + 2  # chunk level + log_f(group) + the merge of two groups


# -- the exact rule -----------------------------------------------------------------------
def test_unanimous_vote_decides_by_quorum_with_full_confidence():
    v = final(Tally.of(votes(yes=25)))
    assert (v.option, v.reason, v.confidence, v.share) == ("yes", Reason.QUORUM, 1.0, 1.0)


def test_split_vote_goes_to_the_strict_majority():
    v = final(Tally.of(votes(yes=51, no=49)))
    assert (v.option, v.reason) == ("yes", Reason.QUORUM)
    assert v.share == pytest.approx(0.51)


def test_an_exact_tie_goes_to_the_tie_breaker():
    tally = Tally.of(votes(yes=50, no=50))
    assert final(tally).reason is Reason.TIE_BREAK
    assert final(tally).option == "no"  # lexicographic: smallest name among the leaders
    pol = ConsensusSpec(tie_breaker="option", tie_break_option="escalate")
    assert final(tally, pol).option == "escalate"
    seeded = {
        final(tally, ConsensusSpec(tie_breaker="seeded", seed=s)).option for s in range(20)
    }
    assert seeded == {"no", "yes"}  # the seed picks among the leaders, both happen
    again = final(tally, ConsensusSpec(tie_breaker="seeded", seed=3)).option
    assert again == final(tally, ConsensusSpec(tie_breaker="seeded", seed=3)).option


def test_no_majority_among_three_options_is_a_tie_break_on_the_plurality():
    v = final(Tally.of(votes(a=40, b=35, c=25)))
    assert (v.option, v.reason) == ("a", Reason.TIE_BREAK)


def test_supermajority_share_is_respected():
    pol = ConsensusSpec(majority_share=2 / 3)
    assert final(Tally.of(votes(yes=66, no=34)), pol).reason is Reason.TIE_BREAK
    assert final(Tally.of(votes(yes=67, no=33)), pol).reason is Reason.QUORUM


def test_weights_and_confidence_can_outvote_headcount():
    vs = [
        Vote("a", 5.0, 0.2),
        Vote("a", 5.0, 0.2),
        Vote("b", 1.0, 1.0),
        Vote("b", 1.0, 1.0),
        Vote("b", 1.0, 1.0),
    ]
    t = Tally.of(vs)
    assert final(t).option == "b"  # count: 3 to 2
    assert final(t, ConsensusSpec(weigh_by="weight")).option == "a"  # 10 to 3
    assert final(t, ConsensusSpec(weigh_by="confidence")).option == "b"  # 2 to 3


def test_waiting_then_timeout_then_tie_break_as_votes_go_missing():
    pol = ConsensusSpec(quorum_share=0.5)
    # 60 of 100 answered, 40 to 20: a majority in hand, not settled (40 <= 50).
    t = Tally.of(votes(yes=40, no=20), eligible=100)
    assert evaluate(t, pol, Q, population=100, final=False) is None  # keep waiting
    v = evaluate(t, pol, Q, population=100, final=True)
    assert (v.option, v.reason) == ("yes", Reason.TIMEOUT)
    assert 0.9 < v.confidence < 1.0
    # 55 to 5: settled, 55 > 50 whatever the other 40 say: decided before the deadline.
    t = Tally.of(votes(yes=55, no=5), eligible=100)
    v = evaluate(t, pol, Q, population=100, final=False)
    assert (v.option, v.reason, v.confidence) == ("yes", Reason.QUORUM, 1.0)
    # Only 30 of 100 answered: below the quorum, so the tie-breaker decides at the deadline.
    t = Tally.of(votes(yes=30), eligible=100)
    assert evaluate(t, pol, Q, population=100, final=False) is None
    v = evaluate(
        t,
        ConsensusSpec(tie_breaker="option", tie_break_option="no"),
        Q,
        population=100,
        final=True,
    )
    assert (v.option, v.reason) == ("no", Reason.TIE_BREAK)


def test_failed_voters_count_against_the_quorum_but_not_the_majority():
    t = Tally.of(votes(yes=30, no=10), eligible=100, failed=60)
    assert final(t, population=100).reason is Reason.TIE_BREAK  # 40 answers < 50 needed
    assert final(t, ConsensusSpec(quorum_share=0.4), 100).reason is Reason.QUORUM


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 30), max_size=4),
    st.integers(0, 40),
    st.integers(0, 10),
    st.sampled_from([0.3, 0.5, 0.9, 1.0]),
    st.sampled_from([0.5, 0.6]),
)
def test_tie_breaker_decides_exactly_when_the_rule_fails(
    counts, missing, failed, quorum, share
):
    tally = Tally.of(
        votes(**counts), failed=failed, eligible=sum(counts.values()) + failed + missing
    )
    pol = ConsensusSpec(
        quorum_share=quorum,
        majority_share=share,
        tie_breaker="option",
        tie_break_option="escalate",
    )
    chk = check_rule(tally, pol)
    v = final(tally, pol)
    assert (v.reason is Reason.TIE_BREAK) == (not chk.holds)
    if chk.holds:
        assert v.option == chk.leader
        assert v.reason is (Reason.QUORUM if missing == 0 or chk.settled else Reason.TIMEOUT)
    else:
        assert v.option == "escalate"


def test_tie_break_without_votes_uses_the_question_options():
    assert tie_break(Tally(eligible=5), ConsensusSpec(), Q) == "no"
    assert tie_break(Tally(eligible=5), ConsensusSpec(), Question("free form?")) is None


def test_hierarchical_run_settles_before_every_subtree_replies():
    run = HierarchicalRun(ConsensusSpec(), Q, population=100)
    assert run.next_request().voters is None and run.next_request() is None
    run.observe(Tally.of(votes(yes=30, no=5)))
    assert run.verdict(final=False) is None  # 30 <= 50: the other 65 could still outvote
    run.observe(Tally.of(votes(yes=25)))
    v = run.verdict(final=False)
    assert (v.option, v.reason) == ("yes", Reason.QUORUM)  # 55 > 50: settled


# -- significance and sampling --------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.data())
def test_majority_p_value_is_the_exact_hypergeometric_tail(N, data):
    n = data.draw(st.integers(0, N))
    x = data.draw(st.integers(0, n))
    M = N // 2
    exact = sum(comb(M, k) * comb(N - M, n - k) for k in range(x, min(n, M) + 1)) / comb(N, n)
    assert majority_p_value(x, n, N) == pytest.approx(exact, abs=1e-12)


def population(n: int, yes_share: float, seed: int) -> list[Vote]:
    """Exactly round(n * yes_share) yes votes, in a seeded random order."""
    k = round(n * yes_share)
    vs = [Vote("yes")] * k + [Vote("no")] * (n - k)
    random.Random(seed).shuffle(vs)
    return vs


def ask(pop: list[Vote | str]):
    def _ask(req):
        idx = range(len(pop)) if req.voters is None else req.voters
        outcomes = {i: pop[i] for i in idx}
        votes_ = {i: o for i, o in outcomes.items() if isinstance(o, Vote)}
        return Tally.of_outcomes(outcomes.values()), votes_

    return _ask


def exact_majority(pop) -> str | None:
    return run_sync(_run(ConsensusSpec(), Q, len(pop)), ask(pop)).option


@pytest.mark.parametrize("n", [200, 2_000, 10_000])
def test_probabilistic_agrees_with_exact_majority_at_60_40(n):
    pol = ConsensusSpec(mode="probabilistic", confidence=0.95)
    trials, agree, asked, reasons = 200, 0, [], []
    for seed in range(trials):
        pop = population(n, 0.6, seed)
        run = _run(pol, Question(f"trial {seed}", ("no", "yes")), n)
        v = run_sync(run, ask(pop))
        agree += v.option == exact_majority(pop) == "yes"
        asked.append(run.tally.eligible)
        reasons.append(v.reason)
    assert agree / trials >= 0.95
    if n >= 2_000:  # a clear majority is decided from a small sample, by the test
        assert sum(asked) / trials < n / 4
        assert reasons.count(Reason.CONFIDENCE) / trials >= 0.95


def test_sequential_test_rarely_claims_a_majority_that_is_not_there():
    """At an exact 50/50 split no option has a majority: the test must claim one in at
    most 1 - confidence of trials (the union bound over looks makes it far rarer)."""
    pol = ConsensusSpec(mode="probabilistic", confidence=0.9)
    claims = 0
    for seed in range(200):
        pop = population(1_000, 0.5, seed)
        v = run_sync(_run(pol, Question(f"null {seed}", ("no", "yes")), 1_000), ask(pop))
        claims += v.reason is Reason.CONFIDENCE
    assert claims / 200 <= 0.1


def test_probabilistic_run_skips_voters_that_never_answer():
    pop: list[Vote | str] = population(2_000, 0.65, 1)
    for i in range(0, 2_000, 5):
        pop[i] = MISSING  # a fifth of the voters are dead
    run = _run(ConsensusSpec(mode="probabilistic"), Q, 2_000)
    v = run_sync(run, ask(pop))
    assert (v.option, v.reason) == ("yes", Reason.CONFIDENCE)
    assert run.tally.missing > 0 and run.tally.eligible < 2_000


def test_snowball_agrees_with_exact_majority_at_60_40():
    pol = ConsensusSpec(mode="snowball")
    agree = 0
    for seed in range(100):
        pop = population(2_000, 0.6, seed)
        agree += (
            run_sync(_run(pol, Question(f"s{seed}", ("no", "yes")), 2_000), ask(pop)).option
            == "yes"
        )
    assert agree >= 95


def test_snowball_accepts_after_consecutive_successful_rounds():
    pop = population(1_000, 1.0, 0)  # unanimous: every round succeeds
    run = _run(ConsensusSpec(mode="snowball", snowball_rounds=4), Q, 1_000)
    v = run_sync(run, ask(pop))
    assert (v.option, v.reason, run.rounds) == ("yes", Reason.CONFIDENCE, 4)


def test_same_question_and_seed_sample_the_same_voters():
    pol = ConsensusSpec(mode="probabilistic")
    a = _run(pol, Q, 5_000).next_request().voters
    assert a == _run(pol, Q, 5_000).next_request().voters
    assert a != _run(pol.model_copy(update={"seed": 1}), Q, 5_000).next_request().voters


def test_level_budgets_nest():
    b0 = 30.0
    b1 = child_budget_s(b0)
    b2 = child_budget_s(b1)
    assert 0 < b2 < wait_budget_s(b1) < b1 < wait_budget_s(b0) < b0
    assert child_budget_s(0.25) > 0.2  # a short sampling round keeps most of its time


# -- memo ---------------------------------------------------------------------------------
def _decision(option: str = "yes") -> Decision:
    return Decision(
        Q, option, Reason.QUORUM, Tally.of(votes(yes=3)), 1.0, 1.0, "hierarchical", 3
    )


def test_memo_returns_the_decision_within_ttl_with_its_age_then_forgets():
    clock = FakeClock()
    memo = DecisionMemo(clock)
    pol = ConsensusSpec(memo_ttl_s=60)
    key = memo_key(Q, pol)
    memo.put(key, _decision(), pol.memo_ttl_s)
    clock.advance(59.5)
    hit = memo.get(key)
    assert hit is not None and hit.cached and hit.age_s == pytest.approx(59.5)
    assert hit.option == "yes"
    clock.advance(0.5)
    assert memo.get(key) is None  # expired: the caller recomputes
    assert len(memo) == 0


def test_memo_invalidation_and_keys():
    memo = DecisionMemo(FakeClock())
    pol = ConsensusSpec()
    k1 = memo_key(Q, pol)
    assert k1 == memo_key(
        Question("ship it?", ("no", "yes")), pol.model_copy(update={"memo_ttl_s": 5})
    )  # the TTL is not part of the question
    k2 = memo_key(Q, ConsensusSpec(mode="probabilistic"))
    k3 = memo_key(Question("ship it?", ("yes", "no", "later")), pol)
    assert len({k1, k2, k3, memo_key(Q, pol, scope="other electorate")}) == 4
    memo.put(k1, _decision(), 60)
    memo.put(k2, _decision("no"), 60)
    assert memo.invalidate(k1) == 1 and memo.get(k1) is None and memo.get(k2) is not None
    assert memo.invalidate() == 1 and memo.get(k2) is None
    memo.put(k1, _decision(), 0)  # TTL 0: memoization off
    assert memo.get(k1) is None


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("confidence", 0.5, "strictly between 0.5 and 1"),
        ("confidence", 1.0, "strictly between 0.5 and 1"),
        ("confidence", 0.2, "got 0.2"),
        ("fan_out", 1, "fan_out must be >= 2"),
        ("fan_out", 0, "got 0"),
        ("quorum_share", 0, "greater than 0"),
        ("timeout_s", -1, "greater than 0"),
        ("mode", "telepathy", "hierarchical"),
        ("fanout", 4, "Extra inputs"),
    ],
)
def test_bad_policy_is_rejected_naming_the_field(field, value, needle):
    with pytest.raises(ValidationError) as exc:
        ConsensusSpec.model_validate({field: value})
    err = exc.value.errors()[0]
    assert err["loc"] == (field,)
    assert needle in str(exc.value)


def test_inconsistent_policies_are_rejected():
    with pytest.raises(ValidationError, match="needs tie_break_option"):
        ConsensusSpec(tie_breaker="option")
    with pytest.raises(ValidationError, match="needs mode 'hierarchical'"):
        ConsensusSpec(mode="probabilistic", weigh_by="weight")


def test_empty_voter_set_and_bad_votes_are_rejected():
    with pytest.raises(ConsensusError, match="voter set is empty"):
        _run(ConsensusSpec(), Q, 0)
    for bad in [None, "", ("a", -1.0), {"option": "a", "confidence": 2}, 3]:
        with pytest.raises(ConsensusError):
            as_vote(bad)
    with pytest.raises(ConsensusError, match="non-empty string"):
        Question("  ")
    with pytest.raises(ConsensusError, match="distinct"):
        Question("q", ("a", "a"))
