"""The simulator against queueing theory, with fixed seeds.

Run lengths are chosen so that the standard error of each estimate is about 1% (from
batch means over longer runs): a 3% tolerance is then a 3-sigma check, and a modelling
error of a few percent would show. Runs are as short as that allows.
"""

from __future__ import annotations

import math

import pytest

from fleet.sim import Simulation

from .helpers import mmc, supermarket

TOLERANCE = 0.03


def erlang_c_wait(c: int, rho: float, mu: float = 1.0) -> float:
    """Mean wait in queue of M/M/c (Erlang C): C(c, a) / (c mu - lambda), a = lambda/mu."""
    a = rho * c
    head = sum(a**k / math.factorial(k) for k in range(c))
    tail = a**c / math.factorial(c) * c / (c - a)
    return tail / (head + tail) / (c * mu - rho * c * mu)


def supermarket_sojourn(lam: float, d: int) -> float:
    """Mean time in system of JSQ(d) as n -> infinity, service rate 1 (Mitzenmacher;
    Vvedenskaya et al.): sum over i >= 1 of lam^((d^i - d) / (d - 1))."""
    total, i = 0.0, 1
    while True:
        term = lam ** ((d**i - d) / (d - 1))
        total += term
        if term < 1e-12:
            return total
        i += 1


def test_reference_values():
    # Known values: M/M/1 at rho=0.5 waits 1.0; M/M/2 at rho=0.5 waits 1/3.
    assert erlang_c_wait(1, 0.5) == pytest.approx(1.0)
    assert erlang_c_wait(2, 0.5) == pytest.approx(1 / 3)
    # JSQ(d) with d=1 would be M/M/1; for d=2 at lam=0.5 the first terms are 1, .25, ...
    assert supermarket_sojourn(0.5, 2) == pytest.approx(
        1 + 0.5**2 + 0.5**6 + 0.5**14, rel=1e-4
    )


def _mean(xs) -> float:
    return sum(xs) / len(xs)


# (agents c, load rho, tasks): tasks ~ kappa / 1e-4, kappa = N * relative variance of the
# mean wait, measured per pair (it grows with c and rho).
@pytest.mark.parametrize(
    "c,rho,tasks",
    [
        (1, 0.5, 300_000),
        (2, 0.7, 750_000),
        (3, 0.6, 800_000),
        (1, 0.8, 800_000),
    ],
)
def test_mmc_mean_wait_matches_erlang_c(c, rho, tasks):
    sim = Simulation(mmc(c, rho, tasks, seed=17)).run()
    pool = sim.pools[0]
    assert sim.outcome.count(0) == 0
    measured = _mean(pool.waits)
    expected = erlang_c_wait(c, rho)
    assert measured == pytest.approx(expected, rel=TOLERANCE), (measured, expected)


# (d, lam, agents, tasks): finite n biases the mean up by O(1/n), so heavier loads get
# more agents; tasks for ~1% standard error.
@pytest.mark.parametrize(
    "d,lam,n,tasks",
    [
        (2, 0.5, 200, 150_000),
        (2, 0.8, 400, 300_000),
        (2, 0.95, 1000, 700_000),
        (3, 0.5, 200, 150_000),
        (3, 0.8, 400, 300_000),
        (3, 0.95, 1000, 700_000),
    ],
)
def test_power_of_d_matches_supermarket_model(d, lam, n, tasks):
    sim = Simulation(supermarket(n, d, lam, tasks, seed=23)).run()
    assert sim.outcome.count(0) == 0
    measured = _mean(sim.pools[0].lat)
    expected = supermarket_sojourn(lam, d)
    assert measured == pytest.approx(expected, rel=TOLERANCE), (measured, expected)
