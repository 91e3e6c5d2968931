"""The server-strategy interface every federated algorithm implements.

A strategy is the whole server side of one paper: how client updates become the next
global adapter, what (if anything) clients must do differently, and which server state
(momentum, moments, control variates) must be saved for ``--resume``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from torch import Tensor

from fedit.config import StrategyConfig
from fedit.ops.aggregation import (
    add_prefix,
    client_weights,
    state_norm,
    subtract,
    take_prefix,
)
from fedit.ops.lora_aggregation import fedex_residual, separate_error
from fedit.server.aggregators import Aggregator, MeanAggregator
from fedit.types import AdapterState, ClientInstructions, ClientUpdate

AGGREGATOR_PREFIX = "aggregator"


class ClientStore(Protocol):
    """Where a strategy keeps per-client state too large for memory (SCAFFOLD's c_k with
    many clients). The engine's store (fedit.engine.checkpoint.ClientStateStore) commits
    what was put with the round's checkpoint, so a crash never mixes rounds."""

    def get(self, client_id: int) -> AdapterState | None: ...

    def put(self, client_id: int, state: AdapterState) -> None: ...

    def clear(self) -> None: ...


class Strategy(ABC):
    """Base class. Subclasses are registered with ``fedit.server.strategies.register``.

    LoRA aggregation (``config.lora_aggregation``, see ``fedit.ops.lora_aggregation``):
    in "separate" mode A and B are aggregated like any other tensor. In "exact" mode the
    algorithm still steps A and B as usual, and the FedEx-LoRA residual
    R = Σ_k p_k s·B_k A_k − s·B̄Ā (B̄, Ā the p-weighted means of the clients' factors) is
    collected for the engine to fold into the frozen base weights (``take_base_residual``).
    For FedAvg and FedProx (and SCAFFOLD with server_lr = 1) the merged model then equals
    W0 + Σ_k p_k s·B_k A_k exactly. FedEx-LoRA is defined for FedAvg only; for the
    server-optimiser methods (FedAvgM, FedAdam, ...) fedit uses the same client-factor
    residual, so the base absorbs what averaging the factors loses and the optimiser then
    moves the factors: a consistent choice, not a result from the paper.

    Phases: ``reset`` forgets all server state. The engine calls it where the objective
    changes (``train.objective = "sft_then_dpo"``, at the first DPO round), so the DPO
    rounds start as a pure DPO run would: momenta, adaptive moments and control variates
    estimated on SFT gradients do not steer them. Checkpoints after the switch hold the
    DPO-phase state; a resume from the last SFT round resets again at the switch.

    Aggregation: every strategy takes its Δ from ``combined_delta``, i.e. from its
    ``aggregator`` (``fedit.server.aggregators``; the weighted mean unless
    ``strategy.aggregator`` names a robust or private rule). The aggregator's own state is
    checkpointed with the strategy's (``checkpoint_state``) and reset with it.

    Attributes:
        lora_scaling: s = lora.alpha / lora.r, set by the engine right after building the
            strategy (``strategy.lora_scaling = alpha / r``). Only "exact" mode uses it.
    """

    lora_scaling: float = 1.0
    # extra tensor groups the strategy's client hook sends beside y_k (each shaped like it)
    update_extras: frozenset[str] = frozenset()

    def __init__(
        self, config: StrategyConfig, num_clients: int, aggregator: Aggregator | None = None
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.config = config
        self.num_clients = num_clients
        self.aggregator = aggregator or MeanAggregator()
        self._metrics: dict[str, float] = {}
        self._base_residual: dict[str, Tensor] = {}

    def set_client_store(self, store: ClientStore) -> None:
        """A store for per-client server state too large to keep in memory (SCAFFOLD's c_k
        with many clients). Strategies without such state ignore it."""
        return None

    def client_instructions(self, client_id: int, global_state: AdapterState) -> ClientInstructions:
        """What the client must do this round besides training from x, as plain data
        (``fedit.client.hooks.make_hook`` builds its hook); FedAvg-style methods: nothing."""
        return ClientInstructions()

    @abstractmethod
    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        """Return the next global adapter x from x and the clients' updates. Pure in the
        tensors it is given (it never modifies them); it may update its own server state."""

    def combined_delta(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        """Δ from the clients' deltas: the aggregator's rule over them, with the p_k of
        ``weighting`` (float32)."""
        weights = client_weights(updates, self.config.weighting)
        return self.aggregator.delta(global_state, updates, weights, round_index)

    def metrics(self) -> dict[str, float]:
        """Scalars about the last aggregation, written to metrics.jsonl: "update_norm"
        (‖x_new − x‖) and the separate-averaging LoRA error "lora_rel_error_max" / "_mean"
        (reported in both modes, so the cost of "separate" is always visible)."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Tensor]:
        """Server state to checkpoint (tensors only, saved as safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned. Stateless strategies accept only {}, so
        resuming with another strategy's state fails loudly."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no server state, got {sorted(state)[:3]}"
            )

    def reset(self) -> None:
        """Forget all server state, as at the start of a run (the residual not yet taken,
        which belongs to rounds already aggregated, is kept)."""
        self.load_state_dict({})
        self.aggregator.load_state_dict({})

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Everything ``--resume`` needs: ``state_dict`` and the aggregator's state under
        "aggregator." (no strategy's own keys start with it)."""
        return self.state_dict() | add_prefix(self.aggregator.state_dict(), AGGREGATOR_PREFIX)

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Restore what ``checkpoint_state`` returned."""
        own = {k: t for k, t in state.items() if not k.startswith(AGGREGATOR_PREFIX + ".")}
        self.load_state_dict(own)
        self.aggregator.load_state_dict(take_prefix(state, AGGREGATOR_PREFIX))

    def take_base_residual(self) -> dict[str, Tensor]:
        """Return and clear the residual to add to the frozen base weights, keyed by the
        base layer's PEFT name ("<lora prefix>.base_layer.weight"), float32. Empty in
        "separate" mode. Residuals of rounds not yet taken are summed. Not checkpointed:
        the engine takes it right after ``aggregate`` and saves the updated base."""
        residual, self._base_residual = self._base_residual, {}
        return residual

    def _finish_round(
        self, global_state: AdapterState, new_state: AdapterState, updates: list[ClientUpdate]
    ) -> AdapterState:
        """Bookkeeping each strategy does last in ``aggregate``: record the metrics and, in
        "exact" mode, add this round's FedEx-LoRA residual. Returns ``new_state``."""
        states = [u.state for u in updates]
        weights = client_weights(updates, self.config.weighting)
        error = separate_error(states, weights)
        self._metrics = {
            "update_norm": state_norm(subtract(new_state, global_state)),
            "lora_rel_error_max": error.max,
            "lora_rel_error_mean": error.mean,
        }
        if self.config.lora_aggregation == "exact":
            for key, r in fedex_residual(states, weights, self.lora_scaling).items():
                self._base_residual[key] = self._base_residual.get(key, 0.0) + r
        return new_state
