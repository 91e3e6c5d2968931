"""LoRA dropout with one mask per input tensor instead of one per LoRA module.

PEFT drops out each LoRA module's input on its own: q_proj, k_proj and v_proj read the same
activations and draw three masks over them, gate_proj and up_proj two. Each mask is a
pass over the activations forward and another backward, memory-bound work that on a CPU
costs a sizeable part of a step. ``lora.dropout_mask = "per_input"`` draws one mask per
input tensor: the modules that read it reuse the first one's dropped copy. Every module's
LoRA path still sees standard dropout (each input feature zeroed with probability p and
the rest scaled by 1/(1 − p)); what changes is that the modules reading one input see the
same mask, so their LoRA updates' dropout noise is correlated. bench/w1.py measures what
it saves and checks the held-out loss against per-module masks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer


class _LastInput:
    """The last input a dropout of the model saw, and its dropped copy (weak references:
    autograd keeps what the backward pass needs; this keeps nothing alive)."""

    def __init__(self) -> None:
        self.source: Callable[[], torch.Tensor | None] = lambda: None  # a weakref once set
        self.version = -1
        self.output: Callable[[], torch.Tensor | None] = lambda: None


class InputSharedDropout(torch.nn.Module):
    """Dropout that returns the previous call's output when given the same, unmodified
    tensor again (the next LoRA module reading the same activations)."""

    def __init__(self, p: float, last: _LastInput) -> None:
        super().__init__()
        self.p, self.last = p, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        last = self.last
        output = last.output() if last.source() is x and last.version == x._version else None
        if output is not None:  # the next module reading the same activations
            return output
        output = F.dropout(x, self.p, training=True)
        last.source, last.version, last.output = weakref.ref(x), x._version, weakref.ref(output)
        return output

    def extra_repr(self) -> str:
        return f"p={self.p}, one mask per input"


def share_dropout_masks(model: PeftModel) -> None:
    """Replace every LoRA module's dropout by an InputSharedDropout sharing one record of
    the last input (PEFT's Identity stands where dropout is 0, and stays)."""
    last = _LastInput()
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in module.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                module.lora_dropout[name] = InputSharedDropout(dropout.p, last)
