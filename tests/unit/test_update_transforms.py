"""The coordinator's update transforms (fedit.engine.update_transforms), on hand-made
two-factor adapters: which a config asks for and what each does."""

from __future__ import annotations

import torch

from fedit.config import load_config
from fedit.engine.update_transforms import (
    apply,
    at_own_ranks,
    ranks_for_aggregation,
    shared_only,
    update_transforms,
)
from fedit.types import ClientUpdate

A, B = "layer.lora_A.weight", "layer.lora_B.weight"


def adapter(value: float) -> dict[str, torch.Tensor]:
    return {A: torch.full((2, 3), value), B: torch.full((3, 2), value)}


def update(client_id: int, value: float, num_examples: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id, adapter(value), num_examples, num_steps=1, learning_rate=0.1)


def config(*overrides: str):
    return load_config(None, ['data.path="synthetic"', *overrides])


def test_a_plain_run_transforms_nothing() -> None:
    transforms = update_transforms(config(), None)
    assert transforms.on_arrival == () and transforms.for_aggregation == ()
    updates = [update(0, 1.0)]
    assert apply(transforms.on_arrival, updates, adapter(0.0)) is updates


def test_fedsa_and_mixed_ranks_each_ask_for_their_transforms() -> None:
    fedsa = update_transforms(config('lora.shared="A"'), None)
    assert [t.func for t in fedsa.on_arrival] == [shared_only] and fedsa.for_aggregation == ()
    ranks = ["lora.r=2", "partition.num_clients=2", "lora.client_ranks=[1, 2]"]
    mixed = update_transforms(config(*ranks), [1, 2])
    assert [t.func for t in mixed.on_arrival] == [at_own_ranks]
    assert [t.func for t in mixed.for_aggregation] == [ranks_for_aggregation]


def test_fedsa_keeps_the_global_b_and_mixed_ranks_the_global_rows_beyond_the_rank() -> None:
    global_state = adapter(0.0)
    (kept,) = shared_only([update(0, 1.0)], global_state, "A")
    assert torch.equal(kept.state[A], adapter(1.0)[A]) and torch.equal(
        kept.state[B], global_state[B]
    )
    (ranked,) = at_own_ranks([update(0, 1.0)], global_state, [1])
    assert ranked.state[A][0].eq(1.0).all() and ranked.state[A][1].eq(0.0).all()  # rank 1 of 2
    assert ranked.state[B][:, 0].eq(1.0).all() and ranked.state[B][:, 1].eq(0.0).all()


def test_a_malformed_update_reaches_validation_as_it_came() -> None:
    odd = ClientUpdate(0, {A: torch.ones(1)}, 1, num_steps=1, learning_rate=0.1)
    assert at_own_ranks([odd], adapter(0.0), [1]) == [odd]


def test_ranks_for_aggregation_zero_pads_beyond_each_rank_and_passes_no_updates() -> None:
    (padded,) = ranks_for_aggregation([update(0, 1.0)], adapter(5.0), [1], "examples", "zero_pad")
    assert padded.state[A][1].eq(0.0).all() and padded.state[A][0].eq(1.0).all()
    assert ranks_for_aggregation([], adapter(5.0), [1], "examples", "zero_pad") == []
