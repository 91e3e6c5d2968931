"""Mixed LoRA ranks meeting central DP and the robust rules, as properties of the round's
path (``for_aggregation`` then the aggregator): every rank aggregation the config accepts
keeps central DP's sensitivity of 2C when one client is replaced, and keeps one Byzantine
holder from moving a robust rule's result far. A pairing that cannot is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedit.config import (
    ConfigError,
    DataConfig,
    FederationConfig,
    LoraConfig,
    PartitionConfig,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
)
from fedit.ops.aggregation import client_weights
from fedit.ops.ranks import at_rank, for_aggregation
from fedit.server.aggregators import build_aggregator
from fedit.types import ClientUpdate

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
RANK_AGGREGATIONS = ("zero_pad", "holders")


def mixed_config(ranks: list[int], strategy: StrategyConfig, **parts: object) -> RunConfig:
    """A federation of len(ranks) clients, all selected each round, at rank max(ranks)."""
    return RunConfig(
        data=DataConfig(path="synthetic"),
        partition=PartitionConfig(num_clients=len(ranks)),
        federation=FederationConfig(clients_per_round=len(ranks)),
        lora=LoraConfig(r=max(ranks), client_ranks=ranks),
        strategy=strategy,
        **parts,  # type: ignore[arg-type]
    ).validate()


def accepted(ranks: list[int], strategy: StrategyConfig, **parts: object) -> RunConfig | None:
    """The config, or None where it refuses the pairing."""
    try:
        return mixed_config(ranks, strategy, **parts)
    except ConfigError:
        return None


def aggregate(cfg: RunConfig, global_state, states, ranks) -> dict[str, torch.Tensor]:
    """The round's Δ as the engine builds it: each state at its client's rank (the global's
    values beyond), the rank aggregation, then the aggregator."""
    updates = [
        ClientUpdate(k, at_rank(s, ranks[k], global_state), 1, 1, learning_rate=0.1)
        for k, s in enumerate(states)
    ]
    weights = client_weights(updates, cfg.strategy.weighting)
    mode = cfg.strategy.rank_aggregation
    padded = for_aggregation([u.state for u in updates], ranks, weights, mode, global_state)
    updates = [replace(u, state=s) for u, s in zip(updates, padded, strict=True)]
    return build_aggregator(cfg, len(ranks)).delta(global_state, updates, weights, 0)


def client_states(ranks: list[int], seed: int, scale: float = 1.0):
    """(global adapter, one state per client: the global plus a random delta)."""
    gen = torch.Generator().manual_seed(seed)
    r = max(ranks)
    global_state = {A: torch.randn(r, 6, generator=gen), B: torch.randn(5, r, generator=gen)}
    states = [
        {k: t + scale * torch.randn(t.shape, generator=gen) for k, t in global_state.items()}
        for _ in ranks
    ]
    return global_state, states


def distance(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((x[k] - y[k]) ** 2).sum() for k in x)))


@pytest.mark.parametrize("mode", RANK_AGGREGATIONS)
@pytest.mark.parametrize("seed", range(5))
def test_central_dp_sensitivity_is_2c_when_one_client_is_replaced(mode: str, seed: int) -> None:
    """Replace the only holder of components 4..7 (rank 8 among 2/4/8) by its opposite:
    with the same noise the noised sums differ by the noiseless sums' difference, which
    the accountant assumes is at most 2C."""
    ranks, clip = [2, 4, 8], 1.0
    privacy = PrivacyConfig(
        mode="central", clip_norm=clip, noise_multiplier=1.0, reproducible_noise=True
    )
    strategy = StrategyConfig(rank_aggregation=mode, weighting="uniform")
    cfg = accepted(ranks, strategy, privacy=privacy)
    if cfg is None:  # refused: no guarantee claimed
        assert mode == "holders"
        return
    global_state, states = client_states(ranks, seed)
    neighbour = list(states)
    neighbour[2] = {k: 2 * global_state[k] - t for k, t in states[2].items()}  # Δ → −Δ
    sampled = len(ranks)  # Δ is the noised sum over the fixed denominator m
    moved = sampled * distance(
        aggregate(cfg, global_state, states, ranks),
        aggregate(cfg, global_state, neighbour, ranks),
    )
    assert moved <= 2 * clip * (1 + 1e-5), f"{mode}: the sum moved by {moved:.3f} > 2C"


ROBUST = [
    {"aggregator": "median"},
    {"aggregator": "trimmed_mean", "trim_count": 1},
    {"aggregator": "krum", "byzantine_clients": 1},
    {"aggregator": "multi_krum", "byzantine_clients": 1, "krum_selected": 2},
    {"aggregator": "norm_clip", "clip_norm": 1.0},
    {"aggregator": "centered_clip", "centered_clip_tau": 1.0},
]


@pytest.mark.parametrize("mode", RANK_AGGREGATIONS)
@pytest.mark.parametrize("rule", ROBUST, ids=lambda rule: rule["aggregator"])
def test_one_byzantine_holder_cannot_move_a_robust_rule_far(mode: str, rule: dict) -> None:
    """Ranks 2/2/4/4/4: components 2 and 3 have three holders, one of them Byzantine
    (+1000 everywhere); the honest deltas are within ±0.2."""
    ranks = [2, 2, 4, 4, 4]
    cfg = accepted(ranks, StrategyConfig(rank_aggregation=mode, **rule))
    if cfg is None:
        assert mode == "holders"
        return
    global_state, states = client_states(ranks, seed=0, scale=0.1)
    states = [{k: t.clamp(global_state[k] - 0.2, global_state[k] + 0.2) for k, t in s.items()}
              for s in states]  # fmt: skip
    states[4] = {k: t + 1000.0 for k, t in global_state.items()}
    delta = aggregate(cfg, global_state, states, ranks)
    # zero padding moves a component towards 0 by at most the global's own size
    bound = 0.2 + max(float(t.abs().max()) for t in global_state.values())
    worst = max(float(t.abs().max()) for t in delta.values())
    assert worst <= bound, f"{mode} × {rule['aggregator']}: |Δ| reached {worst:.1f}"
