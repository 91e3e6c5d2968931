"""Greedy generation in left-padded batches, for scoring answers and `fedit generate`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    show_progress: bool = False,
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) for tokenised prompts, in order,
    each ending at the first of `stop_ids` (fedit.data.templates.stop_token_ids: the
    template's end of turn, which training taught, and eos)."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generate", leave=False, disable=not show_progress):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        # Left padding: every row's answer starts at the same position.
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            ids = torch.tensor(list(prompts[i]), dtype=torch.long)
            input_ids[row, width - len(ids) :] = ids
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=list(stop_ids),
        )
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    model.train()
    return [answers[i] for i in range(len(prompts))]
