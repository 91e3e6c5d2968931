"""The server-strategy interface every federated algorithm implements.

A strategy is the whole server side of one paper: how client updates become the next
global adapter, what (if anything) clients must do differently, and which server state
(momentum, moments, control variates) must be saved for ``--resume``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from fedit.client.hooks import ClientHook
from fedit.config import StrategyConfig
from fedit.types import AdapterState, ClientUpdate


class Strategy(ABC):
    """Base class. Subclasses are registered with ``fedit.server.strategies.register``."""

    def __init__(self, config: StrategyConfig, num_clients: int) -> None:
        self.config = config
        self.num_clients = num_clients

    def client_hook(self, client_id: int, global_state: AdapterState) -> ClientHook:
        """The client-side obligation for this round; FedAvg-style methods have none."""
        return ClientHook()

    @abstractmethod
    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        """Return the next global adapter x from x and the clients' updates. Pure in the
        tensors it is given (it never modifies them); it may update its own server state."""

    def metrics(self) -> dict[str, float]:
        """Scalars about the last aggregation, written to metrics.jsonl."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Server state to checkpoint (tensors only, saved as safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
