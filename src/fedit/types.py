"""Small value types shared by client, server and engine (adapter-only tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

# Adapter tensors only (LoRA A/B), keyed by the model's parameter names.
AdapterState = dict[str, Tensor]


@dataclass
class ClientUpdate:
    """What a client sends to the server after local training: never its records."""

    client_id: int
    state: AdapterState  # y_k: the client's adapter after local training
    num_examples: int  # n_k: training records the client holds (FedAvg weight)
    num_steps: int  # K: optimizer steps taken this round
    learning_rate: float  # eta_l used this round (SCAFFOLD option II needs it)
    extras: dict[str, AdapterState] = field(default_factory=dict)  # e.g. SCAFFOLD delta c_k
    metrics: dict[str, float] = field(default_factory=dict)
