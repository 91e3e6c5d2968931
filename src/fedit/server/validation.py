"""Checks on client updates before any strategy sees them.

Pure functions over ``ClientUpdate``, so a networked engine runs the same checks on what
arrives over the wire. A rejected update never reaches ``Strategy.aggregate``: one NaN
client would otherwise make the global adapter NaN and poison the server optimiser's
moments for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Sequence
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
