"""The reducer tree on the session's local Ray cluster: decisions that arrive by their
deadline with dead and slow voters, memoization, and clean teardown."""

from __future__ import annotations

import time

import pytest
import ray

from fleet.consensus import (
    ConsensusSpec,
    Electorate,
    Question,
    Reason,
    decide,
    make_voters,
)
from fleet.policy.consensus import DecisionMemo
from tests.utils import FakeClock, eventually

pytestmark = pytest.mark.ray

N = 600
# Long enough that live voters answer in time even on a loaded 2-core machine, far
# below the slow voters' 60 s, so only the dead and slow ones miss it.
TIMEOUT_S = 8.0
Q = Question("adopt the new pricing?", ("yes", "no"))


def _leftover(name: str) -> list[str]:
    return [a for a in ray.util.list_named_actors() if a.startswith(f"consensus.{name}.")]


@pytest.fixture(scope="module")
def electorates(ray_cluster):
    """Electorates started by the tests here; killed (and checked gone) at teardown."""
    started: list[Electorate] = []

    def start(voters, policy=None, **kw) -> Electorate:
        e = Electorate.start(voters, policy, **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        e.shutdown()

    def all_gone() -> bool:
        left = [n for e in started for n in _leftover(e.name)]
        assert left == [], left
        return True

    eventually(all_gone, 30, 0.2, what="every reducer actor gone")


@pytest.fixture(scope="module")
def faulty(electorates):
    """600 voters, 60% for "yes": 10% dead (never answer), 10% slow (answer after 60 s).

    fan_out 2 and 256 voters a leaf give a root over two leaves: a real two-level tree.
    """
    voters = make_voters(
        N, bias=0.6, dead_share=0.1, slow_share=0.1, slow_latency_s=60.0, seed=11
    )
    return voters, electorates(
        voters, ConsensusSpec(fan_out=2, max_reducers=3, memo_ttl_s=0, timeout_s=TIMEOUT_S)
    )


def _exact(voters, question):
    opinions = [v.opinion(question) for v in voters if v.failure == "none"]
    return max(set(opinions), key=opinions.count)


@pytest.mark.parametrize("mode", ["hierarchical", "probabilistic", "snowball"])
def test_dead_and_slow_voters_never_block_the_decision(faulty, mode):
    voters, electorate = faulty
    assert electorate.reducers == 3 and electorate.plan.actor_depth == 2
    policy = ConsensusSpec(
        mode=mode, fan_out=2, max_reducers=3, timeout_s=TIMEOUT_S, memo_ttl_s=0
    )
    t0 = time.monotonic()
    d = electorate.decide(Q, policy)
    wall = time.monotonic() - t0
    # By its deadline (as measured at the root), and the driver was not held hostage by
    # the 60 s voters either (generous slack for a loaded 2-core machine).
    # Event-loop scheduling on a loaded machine may add a few ms at the root: snowball
    # was measured 10 ms past its deadline under load (reported on issue 8).
    assert d.elapsed_s <= TIMEOUT_S + 0.25
    assert wall < TIMEOUT_S + 5
    assert d.option == _exact(voters, Q) == "yes"
    assert sum(v.opinion(Q) == "yes" for v in voters if v.failure == "none") == 283
    assert d.voters == N and d.messages > 0 and d.depth >= 2
    if mode == "hierarchical":
        # Every voter was asked; the 120 dead or slow ones timed out at their leaf's
        # deadline. 283 of the 480 answers are "yes": a majority in hand but not settled
        # (the 120 silent could have made it 283 to 317), so the reason is "timeout".
        assert d.reason is Reason.TIMEOUT
        assert (d.tally.eligible, d.tally.answered, d.tally.missing) == (N, 480, 120)
        assert d.messages >= N
    elif mode == "probabilistic":
        # A sample established the majority before the deadline.
        assert d.reason is Reason.CONFIDENCE
        assert d.tally.answered < N and d.confidence >= 0.95
    else:
        # Snowball counts a silent voter against a round (as Avalanche does), so with a
        # fifth of the voters silent it may run out of time: then the rule or the
        # tie-breaker decides from the votes in hand, still by the deadline.
        assert d.reason in (Reason.CONFIDENCE, Reason.TIMEOUT, Reason.TIE_BREAK)


def test_everyone_dead_means_the_tie_breaker_decides_at_the_deadline(electorates):
    voters = make_voters(40, dead_share=1.0, seed=2)
    policy = ConsensusSpec(
        timeout_s=0.5, tie_breaker="option", tie_break_option="no", memo_ttl_s=0
    )
    e = electorates(voters, policy)
    d = e.decide(Q)
    assert (d.option, d.reason) == ("no", Reason.TIE_BREAK)
    assert d.tally.answered == 0 and d.tally.missing == 40
    assert d.elapsed_s <= 0.5


def test_unanimous_electorate_decides_at_once_and_memoizes(electorates):
    clock = FakeClock()
    voters = make_voters(300, bias=1.0, seed=5, groups=("emea", "amer", "apac"))
    e = electorates(voters, ConsensusSpec(memo_ttl_s=30, timeout_s=5), clock=clock)
    first = e.decide(Q)
    assert (first.option, first.reason, first.cached) == ("yes", Reason.QUORUM, False)
    # Three regions of 100 on two leaves (200 + 100): once the 200 are in, "yes" is
    # settled (200 > 300 / 2) and the root does not wait for the rest.
    assert first.tally.answered in (200, 300) and first.elapsed_s < 5
    clock.advance(10)
    again = e.decide(Q)
    assert again.cached and again.age_s == pytest.approx(10)
    assert again.tally == first.tally
    clock.advance(25)  # 35 s after the first answer: past the TTL, recomputed
    fresh = e.decide(Q)
    assert not fresh.cached and fresh.age_s == 0
    assert e.decide(Q).cached
    assert e.invalidate(Q) == 1
    assert not e.decide(Q).cached  # invalidated on demand


def test_one_off_decide_builds_and_tears_down_its_tree(ray_cluster):
    before = set(ray.util.list_named_actors())
    memo = DecisionMemo(FakeClock())
    voters = make_voters(50, bias=1.0, seed=9)
    d = decide("one-off?", voters=voters, policy={"timeout_s": 5}, memo=memo)
    assert (d.option, d.reason) == ("yes", Reason.QUORUM)
    assert decide("one-off?", voters=voters, policy={"timeout_s": 5}, memo=memo).cached

    def tree_gone() -> bool:
        left = set(ray.util.list_named_actors()) - before
        assert left == set(), left
        return True

    eventually(tree_gone, 30, 0.2, what="the one-off tree torn down")
