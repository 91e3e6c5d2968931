"""Seeds derived from (run seed, stream, round, client, ...) so that runs are reproducible, a
resumed run draws exactly what an uninterrupted one would, and no two uses of randomness
share a seed by construction: every derived seed names its stream first."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a derived seed is for; the keys each stream takes are listed beside it."""

    SELECTION = 1  # (round,): which clients train in the round
    CLIENT_DATA = 2  # (round, client): the client's batch order and LoRA dropout masks
    # privacy.reproducible_noise only (fedit.privacy.mechanism.noise_seed):
    CENTRAL_NOISE = 3  # (round,): the server's DP noise on the round's sum
    LOCAL_NOISE = 4  # (round, client): a client's DP noise on its own update
    # [attack] (fedit.attacks): (): the malicious set drawn by attack.fraction; (client,):
    # which of its records a data attack poisons; (round, client): gaussian attack noise
    ATTACK = 5
    SECAGG_GRAPH = 6  # (round,): secure aggregation's masking graph (fedit.deploy.secagg)
    # [system] (fedit.fleet.devices): (): every client's device; (round,): who is online
    DEVICES = 7
    RANKS = 8  # (): which client gets which rank tier (fedit.ops.ranks)
    PERSONALIZE = 9  # (client, steps): batch order of fedit personalize's fine-tuning


def derive_seed(run_seed: int, stream: Stream, *keys: int) -> int:
    """A 64-bit seed that depends on the run seed, the stream and every key, in order.

    The number of keys is hashed too: SeedSequence alone gives [s, 1] and [s, 1, 0] the
    same state. 64 bits keep chance collisions negligible at 10^5 client-rounds.
    """
    if not isinstance(stream, Stream):
        raise TypeError(f"derive_seed needs a Stream as its second argument, got {stream!r}")
    entropy = [run_seed, int(stream), len(keys), *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
