"""Mixed LoRA ranks: tiers assigned as configured, truncation that a rank-r_k client trains
inside exactly, and zero-padded aggregation that is exact against a hand-computed ΔW."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedit.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
)
from fedit.models.adapters import get_adapter_state
from fedit.ops.lora_aggregation import exact_mean_delta_w, fedex_residual
from fedit.ops.ranks import (
    at_rank,
    client_ranks,
    for_aggregation,
    holders_mean,
    unseen_product,
)
from fedit.types import ClientTask, ClientUpdate
from tests.conftest import tiny_local_client

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def run_config(n: int = 10, **lora: object) -> RunConfig:
    return RunConfig(
        data=DataConfig(path="synthetic"),
        partition=PartitionConfig(num_clients=n),
        lora=LoraConfig(r=16, **lora),  # type: ignore[arg-type]
    ).validate()


def test_tiers_give_each_rank_its_share_in_a_seeded_order() -> None:
    cfg = run_config(rank_tiers=[4, 8, 16], tier_shares=[0.3, 0.4, 0.3])
    ranks = client_ranks(cfg, 10)
    assert ranks is not None and sorted(ranks) == [4] * 3 + [8] * 4 + [16] * 3
    assert ranks == client_ranks(cfg, 10)
    assert ranks != client_ranks(replace(cfg, seed=cfg.seed + 1), 10)
    odd = client_ranks(run_config(7, rank_tiers=[4, 16], tier_shares=[0.5, 0.5]), 7)
    assert odd is not None and len(odd) == 7 and odd.count(4) in (3, 4)
    assert client_ranks(run_config(3, client_ranks=[2, 16, 4]), 3) == [2, 16, 4]
    assert client_ranks(run_config(), 10) is None


def test_the_config_refuses_ranks_it_cannot_mean() -> None:
    with pytest.raises(ConfigError, match=r"lora.client_ranks: ranks must be in \[1, lora.r"):
        run_config(3, client_ranks=[2, 32, 4])
    with pytest.raises(ConfigError, match="lora.tier_shares: must be positive and sum to 1"):
        run_config(rank_tiers=[4, 8], tier_shares=[0.5, 0.4])
    with pytest.raises(ConfigError, match="lora.client_ranks: lists 2 clients"):
        run_config(3, client_ranks=[2, 4])
    cfg = run_config(3, client_ranks=[2, 16, 4])
    with pytest.raises(ConfigError, match="scaffold cannot be used with mixed LoRA ranks"):
        replace(cfg, strategy=replace(cfg.strategy, name="scaffold")).validate()
    holders_exact = replace(cfg.strategy, rank_aggregation="holders", lora_aggregation="exact")
    with pytest.raises(ConfigError, match="'holders' fills in the components"):
        replace(cfg, strategy=holders_exact).validate()


def two_clients() -> list[dict[str, torch.Tensor]]:
    """Rank 1 and rank 2 of a rank-2 module (A: 2 × 3, B: 4 × 2), beyond rank zero."""
    a0 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    b0 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    a1 = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, -1.0]])
    b1 = torch.tensor([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    return [{A: a0, B: b0}, {A: a1, B: b1}]


def test_zero_padded_exact_aggregation_is_the_hand_computed_delta_w() -> None:
    states, weights, s = two_clients(), [0.25, 0.75], 0.5
    # client 0: b0[:, 0] a0[0]ᵀ; client 1: B1 A1, both written out
    c0 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, 4.0, 0.0], [-1.0, -2.0, 0.0]])
    c1 = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, -2.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = s * (0.25 * c0 + 0.75 * c1)
    padded = for_aggregation(states, [1, 2], weights, "zero_pad", states[1])
    assert torch.allclose(exact_mean_delta_w(padded, weights, s)["m"], expected)
    # what the engine builds: the factor mean plus FedEx-LoRA's residual
    a_mean = 0.25 * padded[0][A] + 0.75 * padded[1][A]
    b_mean = 0.25 * padded[0][B] + 0.75 * padded[1][B]
    residual = fedex_residual(padded, weights, s)["m.base_layer.weight"]
    assert torch.allclose(residual + s * b_mean @ a_mean, expected)
    # zero padding: component 1 is pulled towards 0 by the client without it
    assert torch.equal(b_mean[:, 1], 0.75 * states[1][B][:, 1])


def test_what_a_truncated_start_lacks_of_the_global_product() -> None:
    global_state, s = two_clients()[1], 0.5  # rank 2: component 1 is b1[:, 1] a1[1]ᵀ
    lacked = torch.outer(torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, -1.0]))
    key = "m.base_layer.weight"
    assert torch.equal(unseen_product(global_state, [1], [1.0], s)[key], s * lacked)
    mean = unseen_product(global_state, [1, 2], [0.25, 0.75], s)  # only rank 1 lacks it
    assert torch.equal(mean[key], 0.25 * s * lacked)
    assert unseen_product(global_state, [2], [1.0], s) == {}  # the global rank lacks nothing


def test_holders_average_each_component_over_the_clients_that_have_it() -> None:
    states = two_clients()
    states[0][A][1] = 9.0  # beyond client 0's rank: ignored
    global_state = {A: torch.ones(2, 3), B: torch.ones(4, 2)}
    means = holders_mean(states, [1, 2], [0.25, 0.75], global_state)
    assert torch.equal(means[A][0], 0.25 * states[0][A][0] + 0.75 * states[1][A][0])
    assert torch.equal(means[A][1], states[1][A][1])  # only client 1 holds component 1
    nobody = holders_mean(states, [1, 1], [0.25, 0.75], global_state)
    assert torch.equal(nobody[A][1], torch.ones(3))  # no holder this round: as it was
    filled = for_aggregation(states, [1, 2], [0.25, 0.75], "holders", global_state)
    mean_a = 0.25 * filled[0][A] + 0.75 * filled[1][A]
    assert torch.allclose(mean_a, means[A])  # the strategy's plain mean is the holders' mean
    back = at_rank(states[0], 1, global_state)
    assert torch.equal(back[A][1], torch.ones(3)) and torch.equal(back[B][:, 1], torch.ones(4))
    assert torch.equal(at_rank(states[1], 1)[B][:, 1], torch.zeros(4))


def test_a_rank_limited_client_trains_only_its_components(tiny_model_dir: Path) -> None:
    model, client = tiny_local_client(tiny_model_dir, rank=2)
    gen = torch.Generator().manual_seed(1)  # a global adapter after some rounds: B ≠ 0
    start = {
        k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in get_adapter_state(model).items()
    }
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=1, max_steps=2, learning_rate=1e-2)
    update = client.train(model, start, ClientTask(1, 0, "sft", 1e-2, 3), train)
    assert isinstance(update, ClientUpdate)
    for key, tensor in update.state.items():
        beyond = tensor[2:] if ".lora_A." in key else tensor[:, 2:]
        within = tensor[:2] if ".lora_A." in key else tensor[:, :2]
        start_within = start[key][:2] if ".lora_A." in key else start[key][:, :2]
        assert bool((beyond == 0).all()), key  # exactly zero: a rank-2 LoRA
        assert not torch.equal(within, start_within), key
