"""FedAdagrad, FedYogi and FedAdam: adaptive server optimisers over the mean client delta."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from fedit.config import StrategyConfig
from fedit.ops.aggregation import add_prefix, add_scaled, take_prefix, zeros_like
from fedit.server.aggregators import Aggregator
from fedit.server.strategies.base import Strategy
from fedit.types import AdapterState, ClientUpdate


class FedAdaptive(Strategy):
    """The skeleton of Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Alg. 2).

    Server, with Δ the weighted mean client delta (weighted as FedAvg weights, per
    ``weighting``; the paper's uniform mean is ``weighting = "uniform"``):
        m ← β1·m + (1 − β1)·Δ
        v ← update(v, Δ²)                      (per subclass; always Δ², never m²)
        x ← x + η·m / (√v + τ)
    with m = 0 and v = τ² at the start, as in the paper (no bias correction).
    η = ``server_lr``: steps are about η per coordinate, so the FedAvg-family default of 1.0
    is far too large; the paper tunes it, e.g. 1e-3..1e-2 for adapters. β1, β2, τ =
    ``beta1``, ``beta2``, ``tau``. Client: plain local training. Server state: m and v,
    saved as "m.<param>" and "v.<param>".

    Unlike the OpenFedLLM reference code, v is built from Δ² (not from the squared
    momentum) and Δ is weighted the same way FedAvg weights it.
    """

    def __init__(
        self, config: StrategyConfig, num_clients: int, aggregator: Aggregator | None = None
    ) -> None:
        super().__init__(config, num_clients, aggregator)
        self._m: AdapterState = {}
        self._v: AdapterState = {}

    @abstractmethod
    def second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        """The next v from the current v and Δ²."""

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        delta = self.combined_delta(global_state, updates, round_index)
        beta1, tau = self.config.beta1, self.config.tau
        if not self._m:
            self._m, self._v = zeros_like(delta), zeros_like(delta, fill=tau**2)
        self._m = {key: beta1 * self._m[key] + (1 - beta1) * d for key, d in delta.items()}
        self._v = {key: self.second_moment(self._v[key], d * d) for key, d in delta.items()}
        step = {key: m / (self._v[key].sqrt() + tau) for key, m in self._m.items()}
        new_state = add_scaled(global_state, step, self.config.server_lr)
        return self._finish_round(global_state, new_state, updates)

    def state_dict(self) -> dict[str, Tensor]:
        return add_prefix(self._m, "m") | add_prefix(self._v, "v")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._m, self._v = take_prefix(state, "m"), take_prefix(state, "v")


class FedAdagrad(FedAdaptive):
    """FedAdagrad (Reddi et al. 2021): v ← v + Δ²."""

    def second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return v + delta_squared


class FedYogi(FedAdaptive):
    """FedYogi (Reddi et al. 2021): v ← v − (1 − β2)·Δ²·sign(v − Δ²)."""

    def second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return v - (1 - self.config.beta2) * delta_squared * torch.sign(v - delta_squared)


class FedAdam(FedAdaptive):
    """FedAdam (Reddi et al. 2021): v ← β2·v + (1 − β2)·Δ²."""

    def second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return self.config.beta2 * v + (1 - self.config.beta2) * delta_squared
