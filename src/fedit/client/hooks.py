"""Client-side parts of federated algorithms, plugged into the local trainer.

The trainer calls these at fixed points of every local step. A strategy says what a client
must do in a round as plain data (``Strategy.client_instructions`` → ``ClientInstructions``,
which crosses the wire in a deployment), and ``make_hook`` turns that into the hook here, on
whichever machine the client trains. FedAvg needs none (``ClientHook`` itself is the no-op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedit.ops.aggregation import zeros_like
from fedit.types import AdapterState, ClientInstructions


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


class FedProxHook(ClientHook):
    """Adds μ/2 · Σ_params ‖θ − x‖² to the local loss; x is snapshot at ``start``."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self._anchor: AdapterState = {}

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._anchor = {name: p.detach().clone() for name, p in params.items()}

    def loss_term(self, params: dict[str, torch.nn.Parameter]) -> Tensor | None:
        squared = sum((p - self._anchor[name]).pow(2).sum() for name, p in params.items())
        return 0.5 * self.mu * squared


class ScaffoldHook(ClientHook):
    """Client side of SCAFFOLD for one round, given the server's c and this client's c_k."""

    def __init__(self, c: AdapterState, c_k: AdapterState) -> None:
        self._c, self._c_k = c, c_k
        self._correction: AdapterState = {}
        self._grad_sum: AdapterState = {}
        self._steps = 0

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._correction = {
            name: (self._c[name] - self._c_k[name]).to(p.device, p.dtype)
            for name, p in params.items()
        }
        self._grad_sum = {
            name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()
        }
        self._steps = 0

    def adjust_gradients(self, params: dict[str, torch.nn.Parameter]) -> None:
        """g ← g − c_k + c, remembering the raw g for c_k⁺."""
        self._steps += 1
        for name, p in params.items():
            if p.grad is None:  # no gradient this step: the correction still applies
                p.grad = self._correction[name].clone()
                continue
            self._grad_sum[name] += p.grad.float()
            p.grad.add_(self._correction[name])

    def finish(
        self, params: dict[str, torch.nn.Parameter], num_steps: int, learning_rate: float
    ) -> dict[str, AdapterState]:
        """{"control_delta": c_k⁺ − c_k}, c_k⁺ = mean raw gradient (c_k kept after 0 steps)."""
        if self._steps == 0:
            return {"control_delta": zeros_like(self._c_k)}
        return {
            "control_delta": {
                name: total.cpu() / self._steps - self._c_k[name]
                for name, total in self._grad_sum.items()
            }
        }


def make_hook(instructions: ClientInstructions) -> ClientHook:
    """The hook that carries out a strategy's instructions for one client and round.

    Raises ValueError for an unknown hook name or missing parts, so instructions that came
    over the wire are refused rather than half followed."""
    if instructions.hook == "none":
        return ClientHook()
    if instructions.hook == "fedprox":
        return FedProxHook(_part(instructions.scalars, "prox_mu"))
    if instructions.hook == "scaffold":
        c = _part(instructions.tensors, "c")
        return ScaffoldHook(c, instructions.tensors.get("c_k") or zeros_like(c))
    raise ValueError(f"unknown client hook {instructions.hook!r}")


def _part(parts: dict, name: str):
    if name not in parts:
        raise ValueError(f"client instructions lack {name!r}")
    return parts[name]
