"""The aggregator interface and the default weighted mean."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedit.ops.aggregation import client_deltas, weighted_mean
from fedit.types import AdapterState, ClientUpdate


class Aggregator:
    """Combines the clients' deltas Δ_k = y_k − x into the round's Δ.

    ``delta`` gets the p_k the strategy's ``weighting`` gives (a rule may ignore them, e.g.
    the coordinate-wise median) and the 0-based round index (for a rule that draws noise).
    An aggregator with state across rounds (e.g. a clipping centre) returns it from
    ``state_dict``; the strategy saves it with its own under "aggregator.".
    """

    name = "mean"

    def delta(
        self,
        global_state: AdapterState,
        updates: list[ClientUpdate],
        weights: list[float],
        round_index: int,
    ) -> AdapterState:
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """JSON-ready facts about the last ``delta`` (e.g. which clients a rule left out),
        written under "aggregator" in the round's metrics line; {} for none."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"aggregator {self.name!r} keeps no state, got {sorted(state)[:3]}")


class MeanAggregator(Aggregator):
    """Δ = Σ_k p_k Δ_k: FedAvg's weighted mean (McMahan et al. 2017), the default."""

    name = "mean"

    def delta(self, global_state, updates, weights, round_index) -> AdapterState:
        return weighted_mean(client_deltas(global_state, updates), weights)
