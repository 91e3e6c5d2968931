"""Which LoRA factors the clients share: all of them, or A only (FedSA-LoRA).

FedSA-LoRA (Guo et al. 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning") observes that the A factors learn what clients have in common and the B factors
what is their own. With ``lora.shared = "A"`` each client trains A and its own B_k from
(Ā, B_k), sends A only, and keeps B_k on its own disk between rounds
(fedit.client.store.RoundStore); the server averages the A factors with the run's strategy
and never sees a B. Client k's model is W0 + s·B_k Ā: a personal adapter made *during*
federation. The global adapter's B stays what every LoRA starts from, B = 0, so the global
adapter alone is the base model, and the run is scored per client (`fedit personalize`).

These are the pure parts, on any mapping keyed by adapter names (states, shapes): what
crosses the wire (``shared_part``), what the client keeps (``kept_part``), and how an
update or a message that carries the shared part only is made whole again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

from fedit.config import SHARED_FACTORS
from fedit.ops.lora_aggregation import LORA_A
from fedit.types import AdapterState

V = TypeVar("V")


def is_shared(name: str, shared: str) -> bool:
    """Whether the adapter tensor `name` is one the clients send and the server averages."""
    if shared not in SHARED_FACTORS:
        raise ValueError(f"lora.shared: {shared!r}, expected one of {SHARED_FACTORS}")
    return shared == "all" or LORA_A in name


def shared_part(items: Mapping[str, V], shared: str) -> dict[str, V]:
    """The entries of the shared tensors (all of them with shared = "all")."""
    return {name: v for name, v in items.items() if is_shared(name, shared)}


def kept_part(items: Mapping[str, V], shared: str) -> dict[str, V]:
    """The entries of the tensors each client keeps to itself (none with shared = "all")."""
    return {name: v for name, v in items.items() if not is_shared(name, shared)}


def with_kept(state: AdapterState, source: AdapterState, shared: str) -> AdapterState:
    """`state`'s shared tensors beside `source`'s kept ones, in `source`'s order of names.
    A shared tensor `state` lacks stays missing, so validation refuses the update."""
    kept = kept_part(source, shared)
    merged = {**shared_part(state, shared), **kept}
    return {name: merged[name] for name in [*source, *merged] if name in merged}


def with_zero_kept(
    part: AdapterState, shapes: Mapping[str, tuple[int, ...]], shared: str
) -> AdapterState:
    """A message's shared tensors (checked against the shared `shapes` by the wire) made a
    whole adapter: the kept ones are zeros, the B = 0 every LoRA starts from
    (fedit.models.adapters.attach_lora)."""
    return {
        name: part[name] if is_shared(name, shared) else torch.zeros(shape)
        for name, shape in shapes.items()
    }
