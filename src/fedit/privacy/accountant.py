"""ε of fedit's DP-FedAvg rounds, from Google's dp-accounting (its RDP accountant).

Adjacency: client-level replace-one. Two federations are neighbours when one client's whole
data set is replaced by any other (N, the number of clients, is public). Every release is
a Gaussian mechanism on clipped deltas ‖Δ_k‖ ≤ C: replacing one client moves the sum by at
most 2C, so noise of std σC is a Gaussian mechanism with noise multiplier σC / 2C = σ/2 in
dp-accounting's terms (std over sensitivity). Under add/remove-one adjacency the
sensitivity would be C; fedit does not use it, because it samples a fixed number of
clients, which dp-accounting analyses only under replace-one.

Central mode: each round samples m of the N clients uniformly without replacement (what
fedit.server.selection does, with a secret seed) and releases the noised sum:
``SampledWithoutReplacementDpEvent(N, m, Gaussian(σ/2))`` per round, the amplification by
subsampling of Wang, Balle & Kasiviswanathan (AISTATS 2019, Theorem 27), composed over the
rounds done. With m = N there is no sampling: Gaussian(σ/2) per round.

Local mode: the adversary is the server, which knows who was sampled, so there is no
amplification: each of a client's updates is Gaussian(σ/2), composed over the rounds that
client took part in (``releases``).

RDP (Mironov 2017) is converted to (ε, δ) by dp-accounting's ``compute_epsilon``; the RDP of
one round is computed once per (σ, m, N) and scaled by the number of rounds (RDP composes
additively), so ε after every round costs nothing once the first is known.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

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


def epsilon(
    noise_multiplier: float, rounds: int, delta: float, sampled: int, population: int
) -> float:
    """ε at ``delta`` after ``rounds`` rounds (releases) of ``round_event``; 0 for none."""
    if rounds == 0:
        return 0.0
    rdp = np.array(_round_rdp(noise_multiplier, sampled, population)) * rounds
    eps, _ = rdp_privacy_accountant.compute_epsilon(new_accountant().orders, rdp, delta)
    return float(eps)


@lru_cache(maxsize=16)
def noise_for_target(
    target_epsilon: float, rounds: int, delta: float, sampled: int, population: int
) -> float:
    """The σ (within SIGMA_TOLERANCE of the smallest) whose ε after ``rounds`` rounds is at
    most ``target_epsilon`` at ``delta``: dp-accounting's calibration search (Brent's method
    over the RDP accountant; it guarantees the ε of the σ it returns is not above target)."""
    lower, guess = SIGMA_SEARCH_START
    if epsilon(lower, rounds, delta, sampled, population) <= target_epsilon:
        raise ValueError(
            f"target ε {target_epsilon} is met even by σ = {lower}: no meaningful noise; "
            "set a smaller target or a noise multiplier"
        )
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        new_accountant,
        lambda s: dp_event.SelfComposedDpEvent(round_event(s, sampled, population), rounds),
        target_epsilon,
        delta,
        mechanism_calibration.LowerEndpointAndGuess(lower, guess),
        tol=SIGMA_TOLERANCE,
    )
    return float(sigma)
