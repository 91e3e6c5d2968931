"""FedAvg: the next global adapter is the weighted mean of the clients' adapters."""

from __future__ import annotations

from fedit.ops.aggregation import add_scaled, client_weights, weighted_mean
from fedit.server.aggregators import MeanAggregator
from fedit.server.strategies.base import Strategy
from fedit.types import AdapterState, ClientUpdate


class FedAvg(Strategy):
    """FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017).

    Server: x ← Σ_k p_k y_k, i.e. x ← x + Δ, with p_k = n_k / Σ_j n_j over the sampled
    clients (``weighting = "examples"``, the paper's choice) or 1/K (``"uniform"``).
    With another aggregator (``strategy.aggregator``), x ← x + Δ for its Δ.
    Client: plain local training; no hook. No server state.
    """

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        if type(self.aggregator) is MeanAggregator:  # exactly the plain mean, not a subclass
            # The mean of y_k directly (not x + Δ): exact in floating point, which is what
            # FedEx-LoRA's "merged model = mean of client models" check relies on.
            weights = client_weights(updates, self.config.weighting)
            new_state = weighted_mean([u.state for u in updates], weights)
        else:
            delta = self.combined_delta(global_state, updates, round_index)
            new_state = add_scaled(global_state, delta, 1.0)
        return self._finish_round(global_state, new_state, updates)
