"""Aggregation maths shared by the strategies: pure functions over adapter states.

Notation used by every strategy docstring: x is the global adapter, y_k client k's adapter
after local training, Δ_k = y_k − x, p_k client k's weight among the sampled clients and
Δ = Σ_k p_k Δ_k. Every function returns new tensors and never modifies its inputs.
Sums are taken in at least float32, so bf16 adapters do not lose the small deltas.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedit.types import AdapterState, ClientUpdate

WEIGHTINGS = ("examples", "uniform")


def _wide(tensor: Tensor) -> Tensor:
    """The tensor in float32, or kept as is when it is already wider (float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def clip_to_norm(delta: AdapterState, bound: float) -> tuple[AdapterState, float]:
    """clip_C(Δ) = Δ · min(1, C / ‖Δ‖), ‖·‖ the L2 norm over all tensors, and ‖Δ‖.
    Float32 (float64 kept), a new state."""
    norm = state_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {key: _wide(t) * scale for key, t in delta.items()}, norm


def _check_keys(reference: AdapterState, states: list[AdapterState]) -> None:
    for index, state in enumerate(states):
        if state.keys() != reference.keys():
            missing = sorted(reference.keys() - state.keys())[:3]
            extra = sorted(state.keys() - reference.keys())[:3]
            raise ValueError(
                f"adapter state {index} has different keys (missing {missing}, extra {extra})"
            )


def client_weights(updates: list[ClientUpdate], weighting: str) -> list[float]:
    """p_k for the sampled clients: n_k / Σ_j n_j ("examples") or 1/K ("uniform")."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    if weighting == "uniform":
        return [1.0 / len(updates)] * len(updates)
    if weighting != "examples":
        raise ValueError(f"unknown weighting {weighting!r} (known: {', '.join(WEIGHTINGS)})")
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("weighting='examples' needs clients with num_examples > 0")
    return [u.num_examples / total for u in updates]


def weighted_mean(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Σ_k w_k · state_k per tensor, in the dtype of the first state."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} and {len(weights)}")
    _check_keys(states[0], states[1:])
    return {
        key: sum(w * _wide(s[key]) for s, w in zip(states, weights, strict=True)).to(tensor.dtype)
        for key, tensor in states[0].items()
    }


def client_deltas(global_state: AdapterState, updates: list[ClientUpdate]) -> list[AdapterState]:
    """Δ_k = y_k − x for each update, in float32 (what every aggregator combines)."""
    _check_keys(global_state, [u.state for u in updates])
    return [subtract(u.state, global_state) for u in updates]


def add_scaled(state: AdapterState, step: AdapterState, scale: float) -> AdapterState:
    """state + scale · step, in the dtype of ``state`` (e.g. x ← x + η·v)."""
    return {key: (_wide(t) + scale * _wide(step[key])).to(t.dtype) for key, t in state.items()}


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """a − b per tensor, in float32."""
    return {key: _wide(t) - _wide(b[key]) for key, t in a.items()}


def zeros_like(state: AdapterState, fill: float = 0.0) -> AdapterState:
    """A float32 state shaped like ``state``, every entry ``fill`` (server-state init)."""
    return {key: torch.full_like(_wide(t), fill) for key, t in state.items()}


def state_norm(state: AdapterState) -> float:
    """Global L2 norm over all tensors: sqrt(Σ ‖t‖²)."""
    return math.sqrt(sum(float(_wide(t).pow(2).sum()) for t in state.values()))


def add_prefix(state: AdapterState, prefix: str) -> dict[str, Tensor]:
    """{"<prefix>.<key>": copy}: one part of a strategy's flat ``state_dict``."""
    return {f"{prefix}.{key}": t.detach().clone() for key, t in state.items()}


def take_prefix(flat: dict[str, Tensor], prefix: str) -> AdapterState:
    """Inverse of ``add_prefix``: the entries under ``prefix``, with the prefix removed."""
    start = len(prefix) + 1
    return {key[start:]: t.clone() for key, t in flat.items() if key.startswith(prefix + ".")}
