"""FedSA-LoRA (lora.shared = "A"): which factors cross the wire, how a client keeps its B
factors by round, what the wire refuses, and what the config refuses to combine it with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedit.client.own_factors import OwnFactors
from fedit.client.store import RoundStore
from fedit.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from fedit.models.adapters import get_adapter_state
from fedit.ops.sharing import kept_part, shared_part, with_kept, with_zero_kept
from fedit.protocol import wire
from fedit.protocol.traffic import reply_content
from fedit.types import ClientTask, ClientUpdate
from tests.conftest import tiny_local_client

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
A2, B2 = "n.lora_A.default.weight", "n.lora_B.default.weight"


def state(value: float) -> dict[str, torch.Tensor]:
    return {A: torch.full((2, 3), value), B: torch.full((3, 2), value + 1)}


def test_the_shared_part_is_the_a_factors_and_a_client_keeps_the_b_factors() -> None:
    s = {A: 1, B: 2, A2: 3, B2: 4}
    assert shared_part(s, "A") == {A: 1, A2: 3} and kept_part(s, "A") == {B: 2, B2: 4}
    assert shared_part(s, "all") == s and kept_part(s, "all") == {}
    merged = with_kept(state(5.0), state(0.0), "A")
    assert list(merged) == [A, B]
    assert torch.equal(merged[A], state(5.0)[A]) and torch.equal(merged[B], state(0.0)[B])
    assert list(with_kept({B: torch.ones(3, 2)}, state(0.0), "A")) == [B]  # A stays missing
    whole = with_zero_kept({A: torch.ones(2, 3)}, {A: (2, 3), B: (3, 2)}, "A")
    assert torch.equal(whole[B], torch.zeros(3, 2)) and torch.equal(whole[A], torch.ones(2, 3))
    with pytest.raises(ValueError, match="lora.shared"):
        shared_part(s, "B")


def test_a_client_trains_from_its_own_b_keeps_it_by_round_and_sends_a_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = RoundStore(tmp_path / "client_0", "kept LoRA factors")
    model, client = tiny_local_client(tiny_model_dir, own=OwnFactors(store, "A"))
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=2, learning_rate=1e-2)
    x = get_adapter_state(model)  # B = 0, as the global adapter of a FedSA-LoRA run stays
    first = client.train(model, x, ClientTask(1, 0, "sft", 1e-2, 3), train)
    assert isinstance(first, ClientUpdate)
    kept_1 = store.load(1, kept_part(x, "A"))
    assert all(bool(t.abs().sum() > 0) for t in kept_1.values())  # B_k trained and kept
    for name, tensor in first.state.items():  # the update: trained A, the global's B
        assert torch.equal(tensor, x[name]) == (".lora_B." in name), name
    # round 2, its round-1 update accepted: it starts from (Ā, B_1) and keeps B_2
    a_bar = {k: v + 0.01 if ".lora_A." in k else v for k, v in first.state.items()}
    b = next(name for name in x if ".lora_B." in name)
    own = OwnFactors(store, "A")
    round_2 = ClientTask(2, 0, "sft", 1e-2, 4, feedback_round=1)
    assert torch.equal(own.start(a_bar, round_2)[b], kept_1[b])
    assert isinstance(client.train(model, a_bar, round_2, train), ClientUpdate)
    assert store.has(2) and store.has(1)
    # round 3 after round 2 was not accepted: it starts from B_1 again, and saving round 3
    # drops round 2's, which no coordinator can name any more
    round_3 = ClientTask(3, 0, "sft", 1e-2, 5, feedback_round=1)
    assert torch.equal(own.start(a_bar, round_3)[b], kept_1[b])
    client.train(model, a_bar, round_3, train)
    assert store.has(1) and store.has(3) and not store.has(2)


def test_a_reply_carries_the_shared_factors_and_one_with_b_is_refused() -> None:
    update = ClientUpdate(
        client_id=1,
        state=state(1.0),
        num_examples=4,
        num_steps=2,
        learning_rate=1e-2,
        metrics=dict.fromkeys(wire.SFT_METRICS, 1.0),
    )
    shapes = wire.shapes_of(update.state)
    sent = reply_content(update, shared="A")
    assert set(sent[wire.UPDATE].keys()) == {A}
    got = wire.decode_reply(sent, 1, shared_part(shapes, "A"), set(), 1e-2)
    assert isinstance(got, ClientUpdate) and set(got.state) == {A}
    whole = reply_content(update)  # an owner that sends its B_k as well
    with pytest.raises(wire.WireError, match="lora_B"):
        wire.decode_reply(whole, 1, shared_part(shapes, "A"), set(), 1e-2)


@pytest.mark.parametrize(
    "override, key",
    [
        ('federation.mode="local"', "federation.mode"),
        ('strategy.lora_aggregation="exact"', "strategy.lora_aggregation"),
        ('strategy.name="scaffold"', "strategy.name"),
        ("lora.client_ranks=[2, 4, 8]", "lora.client_ranks"),
        ('compression.upload="int8"', "compression.upload"),
        ('train.objective="dpo"', "train.objective"),
    ],
)
def test_the_config_refuses_what_fedsa_lora_cannot_compose_with(override: str, key: str) -> None:
    base = ['data.path="synthetic"', "partition.num_clients=3", 'lora.shared="A"']
    with pytest.raises(ConfigError, match=f"{key}: "):
        load_config(None, [*base, override])
    with pytest.raises(ConfigError, match="lora.shared: must be one of"):
        RunConfig(
            data=DataConfig(path="synthetic"),
            partition=PartitionConfig(num_clients=3),
            lora=LoraConfig(shared="B"),
        ).validate()
