"""The maths of DPO as pure functions: sequence log-probs and the preference losses.

The local trainer runs the policy (LoRA enabled) and the reference (the same base model
with the adapter disabled, under ``torch.no_grad``) on a batch from
``fedit.data.preferences.collate_pairs``, turns each model's logits into per-row sums with
``sequence_logps``, splits the rows into chosen (first half) and rejected (second half),
and calls ``dpo_loss``. Nothing here touches a model, so every formula is tested by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedit.data.preferences import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label token) per row, skipping −100 labels; (N, T, V), (N, T) → (N,).

    Causal LMs predict the next token, so ``logits[:, t]`` scores ``labels[:, t + 1]``.
    Log-probs are ``logit[label] − logsumexp(logits)`` in float32, one row at a time, so a
    half-precision model keeps its accuracy and no (N, T, V) float32 copy is ever held.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0).unsqueeze(-1)
    rows = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    token_logps = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)
    return (token_logps * mask).sum(dim=-1)


@dataclass
class DPOOutput:
    """The loss to back-propagate and detached statistics for logging.

    ``chosen_rewards`` / ``rejected_rewards`` are the implicit rewards β·(log π − log π_ref)
    per pair; ``accuracy`` is the share of pairs whose chosen reward is higher; ``margin``
    the mean of chosen − rejected reward. All but ``loss`` are detached tensors.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    accuracy: Tensor
    margin: Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> DPOOutput:
    """Preference loss over B pairs of sequence log-probs (each shape (B,)), averaged.

    With h = (π_c − π_r) − (ref_c − ref_r), the log-ratio of chosen over rejected relative
    to the reference:

    * ``"sigmoid"``: DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your
      Language Model is Secretly a Reward Model": −log σ(β·h). With label smoothing
      ε (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"), each
      label is flipped with probability ε: −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    * ``"ipo"``: IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand
      Learning from Human Preferences": (h − 1/(2β))², which regresses h to a
      finite target instead of pushing it to infinity. (TRL feeds IPO per-token *mean*
      log-probs; pass those here to match it.)
    """
    _check_args(beta, label_smoothing, loss_type)
    shapes = {
        tuple(t.shape)
        for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1:
        raise ValueError(f"log-prob tensors must share one shape, got {sorted(shapes)}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    return DPOOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        margin=(chosen_rewards - rejected_rewards).mean(),
    )


def _check_args(beta: float, label_smoothing: float, loss_type: str) -> None:
    """Reject settings that would silently do something other than asked."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to IPO")
