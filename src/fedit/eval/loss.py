"""Held-out loss and perplexity per category (response tokens only, like training)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from fedit.client.batching import collate
from fedit.client.loss import row_loss_sums
from fedit.client.precision import autocast
from fedit.data.tokenize import TokenizedExample


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    pad_id: int,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """{'overall': {...}, category: {'loss', 'perplexity', 'tokens'}}: token-weighted means.

    There must be examples: an empty set has no loss (callers say why it is empty, e.g.
    fedit.engine.federation_data.dropped_reason), and {} would only fail later, unexplained.
    """
    if not examples:
        raise ValueError("heldout_loss: no examples to score")
    model.eval()
    device = next(model.parameters()).device
    loss_sums: dict[str, float] = defaultdict(float)
    token_counts: dict[str, int] = defaultdict(int)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = collate([(e.input_ids, e.labels) for e in chunk], pad_id, device)
        with autocast(model):  # fp32 unless the base weights are half precision
            sums, counts = row_loss_sums(model, batch, logits_on_labels_only=True)
        for example, loss, count in zip(chunk, sums.tolist(), counts.tolist(), strict=True):
            for key in (example.category, "overall"):
                loss_sums[key] += loss
                token_counts[key] += count
    model.train()
    return {
        key: {
            "loss": loss_sums[key] / max(token_counts[key], 1),
            "perplexity": math.exp(loss_sums[key] / max(token_counts[key], 1)),
            "tokens": token_counts[key],
        }
        for key in sorted(token_counts, key=lambda k: (k != "overall", k))
    }
