"""Causal-LM loss summed per row, shared by local training and held-out evaluation."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from fedit.client.batching import IGNORE_INDEX


def row_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], logits_on_labels_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and label-token count per row.

    With `logits_on_labels_only`, the LM head runs only at positions that predict a label:
    on instruction data most positions are prompt, and the head over a 49k vocabulary is
    about a fifth of a small model's arithmetic.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if logits_on_labels_only and _takes_logits_to_keep(model):
        logits = _label_logits(model, inputs, mask)
    else:
        logits = model(**inputs).logits[:, :-1][mask]
    token_losses = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=labels.device).index_add(0, rows, token_losses)
    return sums, mask.sum(dim=1)


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward can limit its logits to chosen positions: transformers
    releases with slice_logits_to_keep take a boolean (batch, length) mask in nearly every
    decoder-only family; earlier ones slice by position only, so they get the full logits."""
    from transformers import modeling_utils

    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(causal_lm))


@functools.cache  # asked on every micro-batch: read each class's signature once
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _label_logits(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Logits at the positions that predict a label, shape (labels, vocab), in row order.

    The model's own forward computes them (a boolean `logits_to_keep` selects the hidden
    states before the LM head), so each family's final logit processing, such as Gemma's
    soft-cap, Cohere's `logit_scale` or Granite's `logits_scaling`, is applied as in the
    model's loss; projecting the decoder's hidden states by hand would skip it. A forward
    that slices by position only (remote code) or ignores the mask is scored on its full
    logits: slower, still the model's own.
    """
    keep = F.pad(mask, (0, 1))  # position t predicts the label at t + 1
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except IndexError:  # hidden[:, keep, :]: a (batch, length) mask indexes no such slice
        logits = model(**inputs).logits
    if logits.shape[:-1] == keep.shape:  # every position's logits
        return logits[:, :-1][mask]
    if logits.shape[:-1] != (int(mask.sum()),):
        raise ValueError(
            f"{type(model).__name__}: logits of shape {tuple(logits.shape)} for a boolean "
            f"logits_to_keep selecting {int(mask.sum())} positions; fedit cannot score this model"
        )
    return logits
