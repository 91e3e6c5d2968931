"""The attack harness for robustness experiments ([attack], fedit.config.AttackConfig).

Off by default, and for experiments only: a config names malicious clients and what they
do. ``model``: attacks on the update a client sends, applied in
fedit.client.session.LocalClient (so every engine runs them). ``data``: attacks on the
records a client trains on, applied before tokenisation for the simulation and a deployed
owner alike (fedit.engine.federation_data). Success metrics: fedit.eval.attack.
"""

from __future__ import annotations

import math

import numpy as np

from fedit.config import ConfigError, RunConfig
from fedit.seeding import Stream, derive_seed


def ceil_share(fraction: float, n: int) -> int:
    """ceil(fraction · n), without the float error that makes ceil(0.3 · 10) = 4."""
    return min(n, math.ceil(round(fraction * n, 9)))


def malicious_clients(cfg: RunConfig, num_clients: int) -> list[int]:
    """The sorted ids of the run's malicious clients among ``num_clients``: attack.clients,
    or the first ceil(attack.fraction · N) of a permutation seeded by the run seed
    (Stream.ATTACK); none without an attack kind. Refuses ids that are not clients of the
    run (N is known once the data is partitioned)."""
    attack = cfg.attack
    if attack.kind == "none":
        return []
    if attack.clients:
        outside = [k for k in attack.clients if not 0 <= k < num_clients]
        if outside:
            raise ConfigError(
                f"attack.clients: {outside} not among the run's {num_clients} client ids "
                f"(0 to {num_clients - 1})"
            )
        return sorted(attack.clients)
    count = ceil_share(attack.fraction, num_clients)
    order = np.random.default_rng(derive_seed(cfg.seed, Stream.ATTACK)).permutation(num_clients)
    return sorted(int(k) for k in order[:count])


def describe(cfg: RunConfig, malicious: list[int]) -> str:
    """One line for the console at the start of a run."""
    who = f"clients {malicious}" if malicious else "no client (the clean reference)"
    return f"attack: {cfg.attack.kind} by {who}"
