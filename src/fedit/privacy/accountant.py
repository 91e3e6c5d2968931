"""ε of fedit's DP-FedAvg rounds, from Google's dp-accounting: privacy loss distributions
("pld", the default, fedit.privacy.pld) or Rényi DP ("rdp"), chosen by privacy.accountant.

Adjacency: client-level replace-one. Two federations are neighbours when one client's whole
data set is replaced by any other (N, the number of clients, is public). Every release is
a Gaussian mechanism on clipped deltas ‖Δ_k‖ ≤ C: replacing one client moves the sum by at
most 2C, so noise of std σC is a Gaussian mechanism with noise multiplier σC / 2C = σ/2 in
dp-accounting's terms (std over sensitivity). Under add/remove-one adjacency the
sensitivity would be C; fedit does not use it, because it samples a fixed number of
clients, which dp-accounting analyses only under replace-one.

Central mode: each round samples m of the N clients uniformly without replacement (what
fedit.fleet.selection does, with a secret seed) and releases the noised sum:
``SampledWithoutReplacementDpEvent(N, m, Gaussian(σ/2))`` per round, amplified by the
sampling (RDP: Wang, Balle & Kasiviswanathan, AISTATS 2019, Theorem 27; PLD: the dominating
pair derived in fedit.privacy.pld), composed over the rounds done. With m = N there is no
sampling: Gaussian(σ/2) per round.

Local mode: the adversary is the server, which knows who was sampled, so there is no
amplification: each of a client's updates is Gaussian(σ/2), composed over the rounds that
client took part in (``releases``).

Both accountants read the same events and are valid upper bounds. PLD is the tighter: it
composes the exact hockey-stick profile of the round's tightest dominating pair (see
fedit.privacy.pld), where RDP (Mironov 2017; Wang, Balle & Kasiviswanathan's bound for the
sampled round) loses in its bound and in its conversion to (ε, δ): σ = 1, m/N = 0.1, 50
rounds, δ = 1e-4: ε 20.6 by PLD, 44.7 by RDP, and a pair of federations reaches 19.2. RDP
is cheap: the RDP of one round is computed once per (σ, m, N) and scaled by the number of
rounds (RDP composes additively). PLD takes up to a few seconds per ε and 5-15 s to search
σ for a target (measured on the demo's settings).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedit.privacy.pld import FixedSizePldAccountant

NEIGHBOURS = NeighboringRelation.REPLACE_ONE
SIGMA_TOLERANCE = 1e-3  # the target-ε search's absolute tolerance on σ
SIGMA_SEARCH_START = (0.05, 1.0)  # lower end (ε far above any target) and first guess


def round_event(noise_multiplier: float, sampled: int, population: int) -> dp_event.DpEvent:
    """One round's release: Gaussian(σ/2) on m = ``sampled`` of ``population`` clients."""
    gaussian = dp_event.GaussianDpEvent(noise_multiplier / 2)
    if sampled >= population:
        return gaussian
    return dp_event.SampledWithoutReplacementDpEvent(population, sampled, gaussian)


def new_accountant() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=NEIGHBOURS)


@lru_cache(maxsize=64)
def _round_rdp(noise_multiplier: float, sampled: int, population: int) -> tuple[float, ...]:
    accountant = new_accountant()
    accountant.compose(round_event(noise_multiplier, sampled, population))
    return tuple(float(v) for v in accountant.rdp)


@lru_cache(maxsize=256)
def epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    sampled: int,
    population: int,
    method: str = "pld",
) -> float:
    """ε at ``delta`` after ``rounds`` rounds (releases) of ``round_event``, by ``method``
    ("pld" or "rdp"); 0 for none."""
    if rounds == 0:
        return 0.0
    if method == "rdp":
        rdp = np.array(_round_rdp(noise_multiplier, sampled, population)) * rounds
        eps, _ = rdp_privacy_accountant.compute_epsilon(new_accountant().orders, rdp, delta)
        return float(eps)
    pld = FixedSizePldAccountant()
    pld.compose(round_event(noise_multiplier, sampled, population), rounds)
    return float(pld.get_epsilon(delta))


@lru_cache(maxsize=16)
def noise_for_target(
    target_epsilon: float,
    rounds: int,
    delta: float,
    sampled: int,
    population: int,
    method: str = "pld",
) -> float:
    """The σ (within SIGMA_TOLERANCE of the smallest) whose ε by ``method`` after ``rounds``
    rounds is at most ``target_epsilon`` at ``delta``: dp-accounting's calibration search
    (Brent's method; it guarantees the ε of the σ it returns is not above target)."""
    lower, guess = SIGMA_SEARCH_START
    if epsilon(lower, rounds, delta, sampled, population, "rdp") <= target_epsilon:
        raise _no_meaningful_noise(target_epsilon)
    rdp_sigma = _calibrate(
        new_accountant,
        target_epsilon,
        rounds,
        delta,
        sampled,
        population,
        mechanism_calibration.LowerEndpointAndGuess(lower, guess),
    )
    if method == "rdp":
        return rdp_sigma
    # PLD's ε is below RDP's (tests/unit/test_pld_accountant.py checks a grid), so RDP's σ
    # meets the target and bounds the search from above; halving finds a σ below (a PLD of
    # small σ is large: its losses span a wide grid, so the search avoids SIGMA_SEARCH_START).
    floor = max(rdp_sigma / 2, lower)
    while epsilon(floor, rounds, delta, sampled, population) <= target_epsilon:
        if floor <= lower:
            raise _no_meaningful_noise(target_epsilon)
        floor = max(floor / 2, lower)
    bracket = mechanism_calibration.ExplicitBracketInterval(floor, rdp_sigma)
    return _calibrate(
        FixedSizePldAccountant, target_epsilon, rounds, delta, sampled, population, bracket
    )


def _calibrate(
    make_accountant: Callable[[], PrivacyAccountant],
    target_epsilon: float,
    rounds: int,
    delta: float,
    sampled: int,
    population: int,
    bracket: mechanism_calibration.BracketInterval,
) -> float:
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        make_accountant,
        lambda s: dp_event.SelfComposedDpEvent(round_event(s, sampled, population), rounds),
        target_epsilon,
        delta,
        bracket,
        tol=SIGMA_TOLERANCE,
    )
    if sigma is None:  # Brent's method did not converge to a σ within target
        raise ValueError(f"no σ found for target ε {target_epsilon} after {rounds} rounds")
    return float(sigma)


def _no_meaningful_noise(target_epsilon: float) -> ValueError:
    return ValueError(
        f"target ε {target_epsilon} is met even by σ = {SIGMA_SEARCH_START[0]}: no meaningful "
        "noise; set a smaller target or a noise multiplier"
    )
