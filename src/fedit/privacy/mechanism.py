"""The Gaussian mechanism of DP-FedAvg as pure functions over adapter states.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018):
each client's round delta Δ_k = y_k − x is clipped to L2 norm at most C, taken globally
over all adapter tensors (fedit.ops.aggregation.clip_to_norm, the clip the
norm-clipping aggregators use too), and Gaussian noise N(0, σ²C²·I) is added, to the sum
of the clipped deltas by the server (``dp_mean``, central) or to each clipped delta by its
client (``local_release``, local). The noise is drawn by ``gaussian_noise`` from a seed that
``noise_seed`` takes from the operating system unless the run asks for reproducible noise.

torch's normal sampler is a floating-point sampler, not one hardened against the
floating-point attacks on DP noise (Mironov, CCS 2012); fedit does not claim that level.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

import torch

from fedit.ops.aggregation import add_scaled, clip_to_norm, subtract
from fedit.seeding import Stream, derive_seed
from fedit.types import AdapterState, ClientUpdate


def gaussian_noise(like: AdapterState, std: float, seed: int) -> AdapterState:
    """N(0, std²) in every entry, float32, shaped like ``like``: one torch generator seeded
    with ``seed`` draws the tensors in ``like``'s key order, so a seed gives one noise."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(t.shape, generator=generator, dtype=torch.float32) * std
        for key, t in like.items()
    }


def noise_seed(run_seed: int, reproducible: bool, stream: Stream, *keys: int) -> int:
    """A fresh 64-bit seed from the OS (``secrets``), or, with ``reproducible``, one derived
    from the run seed: noise whose seed is in the config can be subtracted by anyone who has
    the config, so that is for experiments and tests only."""
    if reproducible:
        return derive_seed(run_seed, stream, *keys)
    return secrets.randbits(64)


def dp_mean(clipped: list[AdapterState], noise: AdapterState, denominator: int) -> AdapterState:
    """(Σ_k clipped_k + noise) / m, float32: DP-FedAvg's server step with m = ``denominator``
    the round's planned number of sampled clients (fixed and public, so it carries no
    information about who replied; a client that did not reply adds zero)."""
    if not 1 <= len(clipped) <= denominator:
        raise ValueError(f"{len(clipped)} deltas for a denominator of {denominator}")
    return {key: (sum(c[key] for c in clipped) + z) / denominator for key, z in noise.items()}


def local_release(
    update: ClientUpdate, global_state: AdapterState, clip_norm: float, std: float, seed: int
) -> AdapterState:
    """Local DP's release: clip(y_k − x) + N(0, std²)."""
    clipped, _ = clip_to_norm(subtract(update.state, global_state), clip_norm)
    return add_scaled(clipped, gaussian_noise(clipped, std, seed), 1.0)


def released_update(
    update: ClientUpdate, global_state: AdapterState, release: AdapterState
) -> ClientUpdate:
    """A copy of the update whose adapter is x + the release (in x's dtype) instead of y_k."""
    return replace(update, state=add_scaled(global_state, release, 1.0))
