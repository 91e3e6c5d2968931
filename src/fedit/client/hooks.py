"""Client-side parts of federated algorithms, plugged into the local trainer.

The trainer calls these at fixed points of every local step; a strategy hands the trainer
a hook per client and round. FedAvg needs none (``ClientHook`` itself is the no-op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedit.types import AdapterState


class ClientHook:
    """No-op base. Override only what an algorithm needs.

    Call order in one round: ``start`` once; per optimizer step ``loss_term`` (added to the
    training loss before backward, per micro-batch, already divided by the accumulation),
    then ``adjust_gradients`` (after backward and before clipping and the optimizer step;
    not called for a step that fp16 loss scaling skips); ``finish`` once, whose result goes
    into ``ClientUpdate.extras``.
    """

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Called with the trainable adapter parameters before the first step."""

    def loss_term(self, params: dict[str, torch.nn.Parameter]) -> Tensor | None:
        return None

    def adjust_gradients(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Modify ``p.grad`` in place."""

    def finish(
        self, params: dict[str, torch.nn.Parameter], num_steps: int, learning_rate: float
    ) -> dict[str, AdapterState]:
        return {}
