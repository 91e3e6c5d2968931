"""Seeds derived from (run seed, round, client, ...) so that runs are reproducible, a resumed
run draws exactly what an uninterrupted one would, and two clients never share a data
order by accident."""

from __future__ import annotations

import numpy as np


def derive_seed(run_seed: int, *keys: int) -> int:
    """A 32-bit seed that depends on the run seed and every key, in order."""
    return int(np.random.SeedSequence([run_seed, *keys]).generate_state(1)[0])
