"""Which clients train in a round: a seeded draw per round, so resumed runs match."""

from __future__ import annotations

import math

import numpy as np

from fedit.seeding import Stream, derive_seed


def clients_per_round(num_clients: int, count: int | None, fraction: float | None) -> int:
    """A count, or ceil(fraction × clients), or everyone."""
    if count is not None:
        return min(count, num_clients)
    if fraction is not None:
        return max(1, math.ceil(fraction * num_clients))
    return num_clients


def select_clients(
    num_clients: int, count: int | None, fraction: float | None, seed: int, round_index: int
) -> list[int]:
    """Sorted client ids sampled without replacement for `round_index`."""
    k = clients_per_round(num_clients, count, fraction)
    if k == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, Stream.SELECTION, round_index))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))
