"""FedAvgM: FedAvg's mean client delta, applied through server momentum."""

from __future__ import annotations

from torch import Tensor

from fedit.config import StrategyConfig
from fedit.ops.aggregation import add_prefix, add_scaled, take_prefix, zeros_like
from fedit.server.aggregators import Aggregator
from fedit.server.strategies.base import Strategy
from fedit.types import AdapterState, ClientUpdate


class FedAvgM(Strategy):
    """FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", 2019).

    Server: v ← β·v + Δ;  x ← x + η_s·v, with v = 0 at the start, β = ``server_momentum``
    (default 0.9) and η_s = ``server_lr`` (default 1). β = 0, η_s = 1 is FedAvg. Δ is
    weighted exactly as FedAvg weights (``weighting``). Client: plain local training.
    Server state: v, saved as "v.<param>".
    """

    def __init__(
        self, config: StrategyConfig, num_clients: int, aggregator: Aggregator | None = None
    ) -> None:
        super().__init__(config, num_clients, aggregator)
        self._velocity: AdapterState = {}

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        delta = self.combined_delta(global_state, updates, round_index)
        beta = self.config.server_momentum
        velocity = self._velocity or zeros_like(delta)
        self._velocity = {key: beta * velocity[key] + d for key, d in delta.items()}
        new_state = add_scaled(global_state, self._velocity, self.config.server_lr)
        return self._finish_round(global_state, new_state, updates)

    def state_dict(self) -> dict[str, Tensor]:
        return add_prefix(self._velocity, "v")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._velocity = take_prefix(state, "v")
