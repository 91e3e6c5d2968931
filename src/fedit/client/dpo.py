"""The maths of DPO as pure functions: sequence log-probs, the preference losses, scores.

The local trainer (``fedit.client.dpo_trainer``) runs the policy (LoRA enabled) and,
once per round under ``torch.no_grad``, the reference (the same base model with the
adapter disabled, or the round's starting adapter) on batches from
``fedit.data.preferences.collate_pairs``, takes per-row sums of the response tokens'
log-probs, splits the rows into chosen (first half) and rejected (second half), and calls
``dpo_loss``. The trainer gets the sums as the negated per-row cross-entropy of
``fedit.client.loss.row_loss_sums`` (the LM head applied only at response positions);
``sequence_logps`` is the same quantity from full logits. ``preference_scores`` turns
held-out log-probs into the accuracy and margin the engine reports. Nothing here touches a
model, so every formula is tested by hand.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedit.config import DPO_LOSS_TYPES
from fedit.data.preferences import IGNORE_INDEX

LOSS_TYPES = DPO_LOSS_TYPES


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


def preference_scores(
    policy: Tensor, reference: Tensor, categories: Sequence[str], beta: float
) -> dict[str, dict[str, float]]:
    """Held-out preference scores from (N, 2) (chosen, rejected) sequence log-probs.

    The implicit reward of a response is β·(log π − log π_ref). Per category and
    "overall": "accuracy" is the share of pairs whose chosen reward is strictly higher (a
    tie, as at the start of training, counts as wrong), "margin" the mean chosen − rejected
    reward, "chosen_reward" / "rejected_reward" the mean of each side (a falling chosen
    reward means DPO is lowering the likelihood of both sides), "pairs" the count.
    """
    if policy.shape != reference.shape or policy.shape != (len(categories), 2):
        shapes = f"{tuple(policy.shape)}, {tuple(reference.shape)}"
        raise ValueError(f"expected two ({len(categories)}, 2) tensors, got {shapes}")
    rewards = beta * (policy.double() - reference.double())
    groups: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(categories):
        groups["overall"].append(index)
        groups[category].append(index)
    scores = {}
    for key in sorted(groups, key=lambda k: (k != "overall", k)):
        chosen, rejected = rewards[groups[key], 0], rewards[groups[key], 1]
        scores[key] = {
            "accuracy": float((chosen > rejected).double().mean()),
            "margin": float((chosen - rejected).mean()),
            "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()),
            "pairs": len(groups[key]),
        }
    return scores
