"""What the coordinator does to the clients' updates before the strategy sees them, as
ordered lists of transforms, so that a feature adds a transform, not a branch in the round.

On arrival, before validation (so that validation and its norm bound see what each client
trained, whatever it sent beyond that):
  1. FedSA-LoRA (lora.shared = "A"): each update's kept factors set to the global's
     (Δ = 0 there), so the server aggregates the shared ones only.
  2. Mixed LoRA ranks (lora.client_ranks): each update beyond its client's rank set to the
     global's own values (Δ = 0 there: it has no such components).
For aggregation, after validation:
  3. Mixed ranks: each update beyond its client's rank zero-padded, or holding the holders'
     mean (strategy.rank_aggregation; fedit.ops.ranks.for_aggregation).
``unseen_part`` is exact aggregation's counterpart with mixed ranks, for the base residual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from fedit.config import RunConfig
from fedit.ops.aggregation import client_weights
from fedit.ops.ranks import at_rank, for_aggregation, unseen_product
from fedit.ops.sharing import with_kept
from fedit.types import AdapterState, ClientUpdate

# (updates, the round's global adapter) -> the updates as the next step must see them
Transform = Callable[[list[ClientUpdate], AdapterState], list[ClientUpdate]]


@dataclass(frozen=True)
class UpdateTransforms:
    """A run's transforms, each list applied in order (`apply`)."""

    on_arrival: tuple[Transform, ...] = ()
    for_aggregation: tuple[Transform, ...] = ()


def update_transforms(cfg: RunConfig, ranks: list[int] | None) -> UpdateTransforms:
    """The transforms cfg asks for; `ranks`: each client's LoRA rank, or None (one rank)."""
    on_arrival: list[Transform] = []
    for_strategy: list[Transform] = []
    if cfg.lora.shared != "all":
        on_arrival.append(partial(shared_only, shared=cfg.lora.shared))
    if ranks is not None:
        on_arrival.append(partial(at_own_ranks, ranks=ranks))
        strategy = cfg.strategy
        for_strategy.append(
            partial(
                ranks_for_aggregation,
                ranks=ranks,
                weighting=strategy.weighting,
                mode=strategy.rank_aggregation,
            )
        )
    return UpdateTransforms(tuple(on_arrival), tuple(for_strategy))


def apply(
    transforms: Sequence[Transform], updates: list[ClientUpdate], global_state: AdapterState
) -> list[ClientUpdate]:
    for transform in transforms:
        updates = transform(updates, global_state)
    return updates


def shared_only(
    updates: list[ClientUpdate], global_state: AdapterState, shared: str
) -> list[ClientUpdate]:
    """FedSA-LoRA: each update's kept factors set to the global's, whatever a client sent."""
    return [replace(u, state=with_kept(u.state, global_state, shared)) for u in updates]


def at_own_ranks(
    updates: list[ClientUpdate], global_state: AdapterState, ranks: list[int]
) -> list[ClientUpdate]:
    """Mixed ranks: each update beyond its client's rank set to the global's own values. A
    malformed update is left as it came, for validation to refuse."""
    shapes = {k: t.shape for k, t in global_state.items()}
    fixed = []
    for u in updates:
        formed = {k: t.shape for k, t in u.state.items()} == shapes
        if formed and 0 <= u.client_id < len(ranks):
            u = replace(u, state=at_rank(u.state, ranks[u.client_id], global_state))
        fixed.append(u)
    return fixed


def ranks_for_aggregation(
    updates: list[ClientUpdate],
    global_state: AdapterState,
    ranks: list[int],
    weighting: str,
    mode: str,
) -> list[ClientUpdate]:
    """Mixed ranks: the validated updates as the strategy aggregates them."""
    if not updates:  # the simulated devices left nobody this round
        return updates
    weights = client_weights(updates, weighting)
    own = [ranks[u.client_id] for u in updates]
    states = for_aggregation([u.state for u in updates], own, weights, mode, global_state)
    return [replace(u, state=state) for u, state in zip(updates, states, strict=True)]


def unseen_part(
    updates: list[ClientUpdate],
    global_state: AdapterState,
    ranks: list[int],
    weighting: str,
    scaling: float,
) -> dict[str, torch.Tensor]:
    """Exact aggregation with mixed ranks: Σ_k p_k of what each client's truncated start
    lacked of the global merged model (RoundPlan.start_residual), which its own merged
    model held in its base, so that the base residual R takes it over."""
    weights = client_weights(updates, weighting)
    own = [ranks[u.client_id] for u in updates]
    return unseen_product(global_state, own, weights, scaling)
