"""The aggregator seam: strategies take Δ from it, and its state is checkpointed with theirs."""

from __future__ import annotations

import pytest
import torch

from fedit.config import ConfigError, RunConfig, StrategyConfig
from fedit.server.aggregators import Aggregator, build_aggregator
from fedit.server.strategies import build_strategy
from fedit.types import ClientUpdate


class FirstClientOnly(Aggregator):
    """Δ = Δ_1, and it remembers how many rounds it combined (state to checkpoint)."""

    name = "first"

    def __init__(self) -> None:
        self.rounds = torch.zeros(1)

    def delta(self, global_state, updates, weights, round_index):
        self.rounds = self.rounds + 1
        return {k: updates[0].state[k] - x for k, x in global_state.items()}

    def state_dict(self):
        return {"rounds": self.rounds.clone()}

    def load_state_dict(self, state):
        self.rounds = state.get("rounds", torch.zeros(1)).clone()


def update(client_id: int, value: float) -> ClientUpdate:
    return ClientUpdate(client_id, {"w": torch.tensor([value])}, 10, 1, 0.1)


X = {"w": torch.tensor([1.0])}


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "scaffold"])
def test_every_strategy_steps_with_the_aggregators_delta(name):
    options = {"server_lr": 1.0, "server_momentum": 0.0} if name != "fedadam" else {}
    strategy = build_strategy(StrategyConfig(name=name, **options), 3, FirstClientOnly())
    updates = [update(0, 3.0), update(1, 100.0)]
    if name == "scaffold":
        for u in updates:
            u.extras["control_delta"] = {"w": torch.zeros(1)}
    new = strategy.aggregate(X, updates, 0)
    if name == "fedadam":  # the first step is η·(1−β1)Δ / (sqrt((1−β2)... )): its sign is Δ's
        assert float(new["w"]) > 1.0
    else:  # x + Δ_1 = 3, not the mean's 51.5
        assert torch.equal(new["w"], torch.tensor([3.0]))


def test_aggregator_state_is_saved_and_restored_with_the_strategys():
    strategy = build_strategy(StrategyConfig(name="fedavgm"), 3, FirstClientOnly())
    strategy.aggregate(X, [update(0, 2.0)], 0)
    saved = strategy.checkpoint_state()
    assert saved["aggregator.rounds"].item() == 1 and "v.w" in saved
    resumed = build_strategy(StrategyConfig(name="fedavgm"), 3, FirstClientOnly())
    resumed.load_checkpoint_state(saved)
    assert resumed.aggregator.rounds.item() == 1
    assert torch.equal(resumed.state_dict()["v.w"], strategy.state_dict()["v.w"])
    resumed.reset()
    assert resumed.aggregator.rounds.item() == 0 and resumed.state_dict() == {}


def test_the_default_aggregator_is_the_weighted_mean():
    cfg = RunConfig()
    strategy = build_strategy(cfg.strategy, 2, build_aggregator(cfg, 2))
    new = strategy.aggregate(X, [update(0, 3.0), update(1, 5.0)], 0)
    assert torch.equal(new["w"], torch.tensor([4.0]))


def test_an_unknown_aggregator_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="strategy.aggregator.*'modal'"):
        StrategyConfig(aggregator="modal").validate()
