"""FedProx: FedAvg on the server, a proximal term pulling each client towards x."""

from __future__ import annotations

from fedit.server.strategies.fedavg import FedAvg
from fedit.types import AdapterState, ClientInstructions


class FedProx(FedAvg):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

    Client: minimise F_k(θ) + μ/2 ‖θ − x‖² over the adapter parameters, x being the global
    adapter the round started from (``fedit.client.hooks.FedProxHook``; its gradient is
    μ(θ − x)). The hook returns the term for one optimizer step; the trainer scales it like
    the loss (see ``ClientHook``). Server: as FedAvg. μ = ``prox_mu``; μ = 0 asks for no hook,
    so FedProx(μ=0) is FedAvg exactly.
    """

    def client_instructions(self, client_id: int, global_state: AdapterState) -> ClientInstructions:
        if self.config.prox_mu == 0:
            return ClientInstructions()
        return ClientInstructions("fedprox", scalars={"prox_mu": self.config.prox_mu})
