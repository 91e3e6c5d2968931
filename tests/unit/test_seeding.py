"""Derived seeds: every use has its own stream, so no two uses can share a seed by design."""

import itertools

import pytest

from fedit.seeding import Stream, derive_seed


@pytest.mark.parametrize("run_seed", [0, 42])
def test_no_two_stream_and_key_combinations_share_a_seed(run_seed: int) -> None:
    combos = [(Stream.SELECTION, (r,)) for r in range(40)]
    combos += [(Stream.CLIENT_DATA, (r, k)) for r, k in itertools.product(range(40), range(40))]
    # the same stream with one key more or less (SeedSequence alone maps [s, 1] and
    # [s, 1, 0] to the same state)
    combos += [(stream, (*keys, 0)) for stream, keys in combos[:40]]
    seeds = [derive_seed(run_seed, stream, *keys) for stream, keys in combos]
    assert len(set(seeds)) == len(seeds)


def test_round_selection_and_round_one_client_data_are_apart() -> None:
    # the seeds used to be derive_seed(seed, 1, r) for round r's selection and
    # derive_seed(seed, r, k) for client k's data: equal for round 1 and client k = r
    for r in range(20):
        assert derive_seed(42, Stream.SELECTION, r) != derive_seed(42, Stream.CLIENT_DATA, 1, r)


def test_a_seed_needs_a_stream() -> None:
    with pytest.raises(TypeError, match="Stream"):
        derive_seed(42, 1, 3)  # type: ignore[arg-type]
