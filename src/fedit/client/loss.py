"""Causal-LM loss summed per row, shared by local training and held-out evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedit.client.batching import IGNORE_INDEX


def row_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], logits_on_labels_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and label-token count per row.

    With `logits_on_labels_only`, the decoder's hidden states are projected by the LM
    head only at positions that predict a label: on instruction data most positions are
    prompt, and the head over a 49k vocabulary is about a fifth of a small model's
    arithmetic. This path calls the decoder and the output embedding directly, which
    fits decoder-only models whose logits are lm_head(hidden) (Llama, Mistral, Qwen, ...);
    switch it off for models that post-process logits (e.g. soft-capping).
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if logits_on_labels_only:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal_lm.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][mask]
    token_losses = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=labels.device).index_add(0, rows, token_losses)
    return sums, mask.sum(dim=1)
