"""The PLD accountant (fedit.privacy.pld) against known values and bounds: dp-accounting's own
Gaussian PLD, the closed form of one sampled round, a pair of federations that reaches its
ε, RDP above it, the target-ε search, and a run's ε by the accountant its config names."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from scipy.stats import norm

from fedit.privacy import accountant, resolve_plan
from fedit.privacy.pld import FixedSizePldAccountant
from tests.unit.test_privacy import dp_config


def gaussian_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism whose mean shift over std is mu (Balle & Wang, ICML
    2018, Theorem 8)."""
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (0.7, 6)])
def test_without_sampling_it_is_the_gaussian_mechanism(sigma, rounds) -> None:
    # replace-one moves the sum by 2C against noise σC: a shift of 2/σ per round, √T·2/σ after T
    pld = FixedSizePldAccountant()
    pld.compose(accountant.round_event(sigma, 10, 10), rounds)
    mu = math.sqrt(rounds) * 2 / sigma
    for eps in (0.5, 2.0, 5.0):
        exact = gaussian_delta(eps, mu)
        assert exact <= pld.get_delta(eps) <= exact * (1 + 1e-3) + 1e-12
    # dp-accounting's PLDAccountant, whose Gaussian sensitivity under add/remove is our 2C
    theirs = PLDAccountant().compose(dp_event.GaussianDpEvent(sigma / 2), rounds)
    assert pld.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-3)


@pytest.mark.parametrize(("sigma", "m", "n"), [(1.0, 1, 10), (2.0, 5, 10), (0.8, 3, 100)])
def test_one_sampled_round_is_the_amplification_bound(sigma, m, n) -> None:
    # Balle, Barthe & Gaboardi: at ε' = log(1 + q(e^ε − 1)), δ' = q·δ_G(ε), and the pair
    # (q·N(2C) + (1−q)·N(0), N(0)) of two federations reaches it
    q = m / n
    pld = FixedSizePldAccountant()
    pld.compose(accountant.round_event(sigma, m, n))
    for eps in (0.5, 1.5, 4.0):
        amplified = math.log1p(q * math.expm1(eps))
        bound = q * gaussian_delta(eps, 2 / sigma)
        assert bound <= pld.get_delta(amplified) <= bound * (1 + 1e-3) + 1e-12


@pytest.mark.parametrize(("sigma", "m", "n", "rounds"), [(1.0, 1, 10, 50), (2.0, 5, 10, 6)])
def test_composed_it_is_at_least_what_one_pair_of_federations_reaches(sigma, m, n, rounds):
    # replacing a client at +C by one at −C among clients at −C gives, every round, the pair
    # (q·N(2C) + (1−q)·N(0), N(0)) after a shift, and its swap for the reverse replacement:
    # dp-accounting's Poisson PLD under add/remove composes exactly these two
    reached = PLDAccountant().compose(
        dp_event.PoissonSampledDpEvent(m / n, dp_event.GaussianDpEvent(sigma / 2)), rounds
    )
    for delta in (1e-2, 1e-5):
        assert accountant.epsilon(sigma, rounds, delta, m, n) >= reached.get_epsilon(delta)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 4.0])
@pytest.mark.parametrize(("m", "n"), [(1, 10), (5, 10), (10, 10)])
def test_pld_epsilon_is_at_most_rdp_epsilon(sigma, m, n) -> None:
    for rounds in (1, 20):
        for delta in (1e-2, 1e-5):
            pld = accountant.epsilon(sigma, rounds, delta, m, n, "pld")
            rdp = accountant.epsilon(sigma, rounds, delta, m, n, "rdp")
            assert pld <= rdp
            assert pld < rdp or rdp == 0


def test_the_issues_example_lies_between_what_a_pair_reaches_and_rdp() -> None:
    # σ = 1, q = 0.1, 50 rounds, δ = 1e-4: a pair of federations reaches 19.18, RDP says 44.73
    reached = PLDAccountant().compose(
        dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(0.5)), 50
    )
    eps = accountant.epsilon(1.0, 50, 1e-4, 1, 10)
    assert reached.get_epsilon(1e-4) == pytest.approx(19.18, abs=0.01)
    assert accountant.epsilon(1.0, 50, 1e-4, 1, 10, "rdp") == pytest.approx(44.73, abs=0.01)
    assert reached.get_epsilon(1e-4) <= eps <= 1.08 * reached.get_epsilon(1e-4)


@pytest.mark.parametrize(("target", "rounds", "m", "n"), [(3.0, 20, 1, 1), (8.0, 6, 5, 10)])
def test_the_pld_search_gives_the_smallest_sigma_that_meets_the_target(target, rounds, m, n):
    delta = 1e-2
    sigma = accountant.noise_for_target(target, rounds, delta, m, n, "pld")
    assert accountant.epsilon(sigma, rounds, delta, m, n, "pld") <= target
    smaller = sigma - 2 * accountant.SIGMA_TOLERANCE
    assert accountant.epsilon(smaller, rounds, delta, m, n, "pld") > target
    assert sigma < accountant.noise_for_target(target, rounds, delta, m, n, "rdp")


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_a_run_reports_epsilon_by_its_configured_accountant(method: str) -> None:
    values = {"federation.rounds": 4, "federation.clients_per_round": 3}
    plan = resolve_plan(dp_config(**values, **{"privacy.accountant": method}), 10)
    assert plan is not None and plan.accountant == method
    for r in (1, 4):
        record = plan.record(r)
        assert record["accountant"] == method
        assert record["epsilon"] == accountant.epsilon(1.0, r, 0.01, 3, 10, method)
    assert method.upper() in plan.describe()


def test_pld_is_the_default() -> None:
    assert dp_config().privacy.accountant == "pld"
