"""Which clients train in a round: a seeded draw per round, so resumed runs match."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedit.config import clients_per_round
from fedit.seeding import Stream, derive_seed


def select_clients(
    num_clients: int,
    count: int | None,
    fraction: float | None,
    seed: int,
    round_index: int,
    among: Sequence[int] | None = None,
) -> list[int]:
    """Sorted client ids sampled without replacement for `round_index`, from `among` (the
    clients that can be selected; default all, and then the draw is the same as before
    `among` existed). Fewer candidates than the round's count: all of them."""
    pool = list(range(num_clients)) if among is None else sorted(among)
    k = min(clients_per_round(num_clients, count, fraction), len(pool))
    if k == len(pool):
        return pool
    rng = np.random.default_rng(derive_seed(seed, Stream.SELECTION, round_index))
    return sorted(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))


def highest_losses(losses: dict[int, float], count: int) -> list[int]:
    """Power-of-choice (Cho, Wang & Joshi 2020, "Client Selection in Federated Learning:
    Convergence Analysis and Power-of-Choice Selection Strategies"): of the d candidates,
    the `count` whose local loss under the global model is highest, sorted by id. Biasing
    selection towards the clients the model fits worst speeds up convergence on non-IID
    data (at some cost in the error floor, the paper's trade-off). Ties go to the lower id."""
    ranked = sorted(losses, key=lambda k: (-losses[k], k))
    return sorted(ranked[:count])
