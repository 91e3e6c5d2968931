"""Checks on client updates before any strategy sees them.

Pure functions over ``ClientUpdate``, so a networked engine runs the same checks on what
arrives over the wire. A rejected update never reaches ``Strategy.aggregate``: one NaN
client would otherwise make the global adapter NaN and poison the server optimiser's
moments for the rest of the run. ``check_update`` holds the checks of what a reply claims
(its counts and metrics), which a process of our own cannot get wrong but a peer can: a
huge num_examples would take over an examples-weighted average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedit.errors import RunStopped
from fedit.types import ClientUpdate


@dataclass(frozen=True)
class Rejection:
    """A client left out of a round's aggregate, and why."""

    client_id: int
    reason: str

    def as_record(self) -> dict[str, Any]:
        """The entry under "rejected" in the round's metrics line."""
        return {"client": self.client_id, "reason": self.reason}


# n_k an update may claim: far beyond any one data owner's records, small enough that no
# single client can outweigh the rest by a made-up count
MAX_EXAMPLES = 10**9


class AllUpdatesRejectedError(RunStopped):
    """Every client of a round was rejected: there is nothing to aggregate."""

    def __init__(self, round_number: int, rejections: Sequence[Rejection]) -> None:
        self.round_number, self.rejections = round_number, list(rejections)
        listed = "; ".join(f"client {r.client_id}: {r.reason}" for r in rejections)
        super().__init__(
            f"round {round_number}: every client was rejected ({listed}); lower "
            "train.learning_rate or check the data and model precision"
        )


def non_finite_reason(update: ClientUpdate) -> str | None:
    """Where the update holds a NaN or inf (its adapter or an extra), or None if nowhere."""
    parts = {"state": update.state} | {f"extras.{k}": v for k, v in update.extras.items()}
    for part, tensors in parts.items():
        for key, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                return f"non-finite values in {part} {key}"
    return None


def reject_non_finite(
    updates: Sequence[ClientUpdate],
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """(updates to aggregate, rejections): an update with any non-finite tensor is rejected."""
    kept, rejected = [], []
    for update in updates:
        reason = non_finite_reason(update)
        if reason is None:
            kept.append(update)
        else:
            rejected.append(Rejection(update.client_id, reason))
    return kept, rejected


def check_update(
    update: ClientUpdate, *, expected_steps: int, max_examples: int = MAX_EXAMPLES
) -> Rejection | None:
    """Why `update` cannot be aggregated as what it claims, or None if it can: num_examples
    an int in [1, max_examples], num_steps the round's `expected_steps` (what
    steps_per_round gives for its num_examples, or train.max_steps), every metric a finite
    number. The tensors are reject_non_finite's to check."""
    examples, steps = update.num_examples, update.num_steps
    if not _is_int(examples) or not 1 <= examples <= max_examples:
        reason = f"num_examples {examples!r} is not an integer in [1, {max_examples}]"
    elif not _is_int(steps) or steps != expected_steps:
        reason = f"num_steps {steps!r}, expected {expected_steps}"
    else:
        reason = non_finite_metric(update.metrics)
    return None if reason is None else Rejection(update.client_id, reason)


def non_finite_metric(metrics: Mapping[str, object]) -> str | None:
    """Which metric is not a finite number (a bool or a list is not one), or None."""
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {key} is not a number ({type(value).__name__})"
        if not math.isfinite(value):
            return f"metric {key} is not finite ({value!r})"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
