"""FedProx: FedAvg on the server, a proximal term pulling each client towards x."""

from __future__ import annotations

import torch
from torch import Tensor

from fedit.client.hooks import ClientHook
from fedit.server.strategies.fedavg import FedAvg
from fedit.types import AdapterState


class FedProxHook(ClientHook):
    """Adds μ/2 · Σ_params ‖θ − x‖² to the local loss; x is snapshot at ``start``."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self._anchor: AdapterState = {}

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._anchor = {name: p.detach().clone() for name, p in params.items()}

    def loss_term(self, params: dict[str, torch.nn.Parameter]) -> Tensor | None:
        squared = sum((p - self._anchor[name]).pow(2).sum() for name, p in params.items())
        return 0.5 * self.mu * squared


class FedProx(FedAvg):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

    Client: minimise F_k(θ) + μ/2 ‖θ − x‖² over the adapter parameters, x being the global
    adapter the round started from (``FedProxHook``; its gradient is μ(θ − x)). The hook
    returns the term for one optimizer step; the trainer scales it like the loss (see
    ``ClientHook``). Server: as FedAvg. μ = ``prox_mu``; μ = 0 hands out the no-op hook,
    so FedProx(μ=0) is FedAvg exactly.
    """

    def client_hook(self, client_id: int, global_state: AdapterState) -> ClientHook:
        if self.config.prox_mu == 0:
            return ClientHook()
        return FedProxHook(self.config.prox_mu)
