"""What passes between the round loop and the engine that reaches the clients: the round's
plan out, the clients' replies back, and ``ClientRunner``, the one part of a round that
differs between engines (in this process for the simulation, over Flower for a
deployment and the Ray runtime; fedit.engine.rounds.RoundLoop runs the rest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedit.config import TrainConfig
from fedit.models.adapters import in_base_layout
from fedit.ops.aggregation import add_scaled
from fedit.ops.ranks import unseen_product
from fedit.types import AdapterState, ClientTask, ClientUpdate, Rejection


@dataclass
class RoundPlan:
    """What one round asks of the clients."""

    round_index: int  # r, 0-based: this is round r + 1
    objective: str  # "sft" | "dpo"
    train_cfg: TrainConfig
    learning_rate: float
    tasks: list[ClientTask]  # one per selected client, in client-id order
    # The exact-aggregation residual the coordinator's model holds (empty in "separate"
    # mode); only clients that share that model (the simulation) need it.
    base_residual: dict[str, torch.Tensor] = field(default_factory=dict)
    # power_of_choice: {candidate: its probed loss} the selection ranked (else empty)
    probed: dict[int, float] = field(default_factory=dict)
    # exact aggregation with mixed ranks: the LoRA scaling s, for start_residual (else None)
    unseen_scaling: float | None = None

    def start_residual(
        self, model: torch.nn.Module, global_state: AdapterState, rank: int | None
    ) -> dict[str, torch.Tensor] | None:
        """The base residual a client of `rank` must train under, or None where it is
        base_residual. Exact aggregation with mixed ranks: base_residual plus what the
        client's truncated global adapter leaves out of the global merged model
        (fedit.ops.ranks.unseen_product), so that every client starts from that model,
        W0 + R + s·B·A, and a round in which no client changes anything changes nothing
        (FLoRA's fixed point). The round loop folds the same parts, p-weighted, into R."""
        if self.unseen_scaling is None or rank is None:
            return None
        unseen = unseen_product(global_state, [rank], [1.0], self.unseen_scaling)
        if not unseen:  # a client at the global rank sees it all
            return None
        unseen = in_base_layout(model, unseen)
        return {k: self.base_residual.get(k, 0.0) + t for k, t in unseen.items()}


@dataclass
class SecureAggregate:
    """All a secure-aggregation round reveals (fedit.deploy.secagg.coordinator): the weighted
    mean Δ = Σ w_k Δ_k / Σ w_k of its surviving clients, not one of their updates."""

    delta: AdapterState
    num_examples: int  # Σ n_k (weighting "examples"), else the number of survivors
    clients: list[tuple[int, dict[str, float]]]  # (id, plaintext metrics) of each survivor
    record: dict[str, Any]  # what metrics.jsonl says of the protocol's round

    def update(self, global_state: AdapterState, learning_rate: float) -> ClientUpdate:
        """The one pseudo-update y = x + Δ the strategy aggregates in the clients' place."""
        return ClientUpdate(
            client_id=-1,
            state=add_scaled(global_state, self.delta, 1.0),
            num_examples=self.num_examples,
            num_steps=0,  # unknown: no strategy that reads it composes with secagg
            learning_rate=learning_rate,
        )


@dataclass
class RoundReplies:
    """What came back from a round's clients."""

    updates: list[ClientUpdate]
    rejected: list[Rejection] = field(default_factory=list)  # e.g. training went non-finite
    dropped: list[Rejection] = field(default_factory=list)  # no reply: offline, timeout, error
    # bytes each client received and sent this round: {client id: {"bytes_down", "bytes_up"}}
    traffic: dict[int, dict[str, int]] = field(default_factory=dict)
    # secure aggregation: the sum in place of `updates` (checked by its protocol)
    aggregate: SecureAggregate | None = None
    # [system]: the round's simulated duration (fedit.fleet.devices), else None
    simulated_seconds: float | None = None


class ClientRunner(Protocol):
    """How an engine reaches its clients: the only part of a round that differs."""

    def run_round(self, plan: RoundPlan, global_state: AdapterState) -> RoundReplies: ...


# power_of_choice's question to the candidates: (candidates, global adapter, round index)
# -> {candidate: its loss on a seeded sample of its records under the global adapter}
LossProbe = Callable[[list[int], AdapterState, int], dict[int, float]]
