"""LoRA-aware aggregation: what averaging A and B separately gets wrong, and how to fix it.

A LoRA module adds s·B·A to its frozen weight W0 (B is out×r, A is r×in, s = alpha/r).
Averaging the factors on their own ("separate", what FedIT codes do) gives s·B̄Ā, which is
not the average of the clients' updates Σ_k p_k s·B_k A_k: a mean of products is not the
product of means. FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Foundation Models") keeps the averaged factors and
folds the residual R = Σ_k p_k s·B_k A_k − s·B̄Ā into W0, so that
W0 + R + s·B̄Ā = W0 + Σ_k p_k s·B_k A_k exactly ("exact").

Keys follow PEFT's parameter names: "<prefix>.lora_A.<adapter>.weight" pairs with
"<prefix>.lora_B.<adapter>.weight", and the frozen weight is "<prefix>.base_layer.weight".
Products are out×in, as B·A is; the engine turns them into the base weight's own layout
(``fedit.models.adapters.in_base_layout``: transposed for GPT-2's Conv1D, whose LoRA has
fan_in_fan_out). LoRA on embeddings ("lora_embedding_A") is left to ordinary averaging.
Products are taken in float32.

Precision. The residual is small beside W0 (1e-4 against weights of 0.03 is typical) and
stored in the base weights' own dtype, where bfloat16 would round about half of it away
and 4/8-bit quantisation all of it. "exact" therefore needs a float32 base: the config
refuses ``model.load_in_bits`` and ``model.dtype = "bfloat16" | "float16"`` with it, and the
engine refuses a base that ``model.dtype = "auto"`` loaded in half precision on a GPU
(``fedit.models.adapters.require_full_precision_base``); set ``model.dtype = "float32"``.
The stored model is then W0 + R + s·B̄Ā to fp32 precision; with mixed precision the forward
still computes in bf16, as it does for every other weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fedit.types import AdapterState

LORA_A = ".lora_A."
LORA_B = ".lora_B."
BASE_WEIGHT = ".base_layer.weight"


@dataclass(frozen=True)
class SeparateError:
    """Relative Frobenius error of separate averaging, ‖Σp B_kA_k − B̄Ā‖ / ‖Σp B_kA_k‖."""

    per_module: dict[str, float]
    max: float
    mean: float


def lora_pairs(state: AdapterState) -> dict[str, tuple[str, str]]:
    """{module prefix: (lora_A key, lora_B key)} for every LoRA module in ``state``."""
    pairs: dict[str, tuple[str, str]] = {}
    for a_key in sorted(k for k in state if LORA_A in k):
        prefix, _, suffix = a_key.rpartition(LORA_A)
        b_key = prefix + LORA_B + suffix
        if b_key not in state:
            raise ValueError(f"{a_key} has no matching {b_key}")
        if prefix in pairs:
            raise ValueError(f"{prefix}: more than one LoRA adapter on a module")
        pairs[prefix] = (a_key, b_key)
    return pairs


def _mean(states: list[AdapterState], key: str, weights: list[float]) -> Tensor:
    return sum(w * s[key].float() for s, w in zip(states, weights, strict=True))


def _products(
    states: list[AdapterState], weights: list[float]
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Per module: (prefix, Σ_k p_k B_k A_k, B̄ Ā), one module at a time to bound memory."""
    for prefix, (a_key, b_key) in lora_pairs(states[0]).items():
        exact = sum(
            w * (s[b_key].float() @ s[a_key].float()) for s, w in zip(states, weights, strict=True)
        )
        yield prefix, exact, _mean(states, b_key, weights) @ _mean(states, a_key, weights)


def exact_mean_delta_w(
    states: list[AdapterState], weights: list[float], scaling: float
) -> dict[str, Tensor]:
    """{prefix: Σ_k p_k s·B_k A_k}: the mean weight update the clients' adapters stand for."""
    return {prefix: scaling * exact for prefix, exact, _ in _products(states, weights)}


def fedex_residual(
    states: list[AdapterState], weights: list[float], scaling: float
) -> dict[str, Tensor]:
    """{"<prefix>.base_layer.weight": Σ_k p_k s·B_k A_k − s·B̄Ā}: what to add to W0."""
    return {
        prefix + BASE_WEIGHT: scaling * (exact - approx)
        for prefix, exact, approx in _products(states, weights)
    }


def _relative(difference: Tensor, reference: Tensor) -> float:
    reference_norm = float(torch.linalg.norm(reference))
    difference_norm = float(torch.linalg.norm(difference))
    if reference_norm == 0.0:
        # All clients' B_kA_k cancel (e.g. every B_k is still zero): nothing to get wrong.
        return 0.0 if difference_norm == 0.0 else float("inf")
    return difference_norm / reference_norm


def separate_error(states: list[AdapterState], weights: list[float]) -> SeparateError:
    """How far separate averaging is from exact, per module and its max / mean over modules.

    The scaling s cancels in the ratio. 0.0 for identical clients; 0.0 with no LoRA modules.
    """
    per_module = {
        prefix: _relative(exact - approx, exact)
        for prefix, exact, approx in _products(states, weights)
    }
    values = list(per_module.values())
    if not values:
        return SeparateError(per_module, 0.0, 0.0)
    return SeparateError(per_module, max(values), sum(values) / len(values))
