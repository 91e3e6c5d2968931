"""Small value types shared by client, server and engine (adapter-only tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    # compressed uploads (fedit.compression): the encoded delta's parts, {part: 1-D tensor},
    # which the wire sends in place of `state`; `state` is then x + decode(encoded)
    encoded: dict[str, Tensor] | None = None


@dataclass
class ClientInstructions:
    """What the server asks of one client for a round besides training from the global
    adapter: plain data, so it crosses the wire as records (fedit.client.hooks.make_hook
    turns it into the client's hook)."""

    hook: str = "none"  # the client-side algorithm: "none" | "fedprox" | "scaffold"
    scalars: dict[str, float] = field(default_factory=dict)  # e.g. {"prox_mu": 0.01}
    tensors: dict[str, AdapterState] = field(default_factory=dict)  # e.g. {"c": .., "c_k": ..}


@dataclass
class ClientTask:
    """One client's part of a round, as the engine hands it over (in process or as a
    message): everything the client needs besides the global adapter and its own data."""

    round_number: int  # 1-based
    client_id: int
    objective: str  # "sft" | "dpo"
    learning_rate: float  # eta_l of this round, from the server's schedule
    seed: int  # derive_seed(run seed, Stream.CLIENT_DATA, round index, client id)
    instructions: ClientInstructions = field(default_factory=ClientInstructions)
    # the round of this client's last update the coordinator accepted (0: none), whose
    # error-feedback memory the client starts from (fedit.client.feedback)
    feedback_round: int = 0


@dataclass(frozen=True)
class Rejection:
    """A client left out of a round's aggregate, and why."""

    client_id: int
    reason: str

    def as_record(self) -> dict[str, Any]:
        """The entry under "rejected" in the round's metrics line."""
        return {"client": self.client_id, "reason": self.reason}
