"""Turn records into token ids and loss labels for supervised fine-tuning.

Each example is ``prompt + response + eos``. Prompt and response are tokenised
separately so the boundary is exact: labels are -100 (ignored by the loss) on prompt
tokens unless ``train_on_prompt``, and the token ids on the response and eos. No special
tokens are added: no BOS for alpaca (kept simple and the same for every tokenizer), and
the chat template already writes its own specials into the prompt text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedit.data.records import Record
from fedit.data.templates import render_prompt

IGNORE_INDEX = -100  # the label torch's cross-entropy skips


@dataclass
class TokenizedExample:
    """One training sequence: ids, per-position labels, and its record's category."""

    input_ids: list[int]
    labels: list[int]
    category: str


@dataclass
class TruncationReport:
    """How many records had tokens cut at max_seq_len, and how many lost all response."""

    total: int
    truncated: int
    dropped: int

    def __add__(self, other: TruncationReport) -> TruncationReport:
        return TruncationReport(
            self.total + other.total,
            self.truncated + other.truncated,
            self.dropped + other.dropped,
        )

    def summary(self) -> str:
        return (
            f"{self.total} records: {self.truncated} truncated to max_seq_len, "
            f"{self.dropped} dropped (no response token left)"
        )


def _batch_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # One call over the whole list lets a fast tokenizer work in Rust, in parallel.
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_prompts(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    system_prompt: str | None = None,
) -> list[list[int]]:
    """Prompt ids for many records at once (the ids training and generation both use)."""
    texts = [render_prompt(r, template, tokenizer, system_prompt) for r in records]
    return _batch_ids(tokenizer, texts)


def tokenize_prompt(
    record: Record,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    system_prompt: str | None = None,
) -> list[int]:
    """Prompt ids for one record, e.g. to generate its response."""
    return tokenize_prompts([record], tokenizer, template, system_prompt)[0]


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_seq_len: int,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Tokenise records into training examples, truncating each to max_seq_len.

    Truncation cuts from the end. A record whose prompt alone fills max_seq_len keeps no
    response token, so it is dropped rather than trained on, and counted in the report.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; examples must end with one")
    prompts = tokenize_prompts(records, tokenizer, template, system_prompt)
    responses = _batch_ids(tokenizer, [r.response for r in records])
    examples: list[TokenizedExample] = []
    truncated = dropped = 0
    for record, prompt, response in zip(records, prompts, responses, strict=True):
        input_ids = (prompt + response + [eos])[:max_seq_len]
        if len(input_ids) < len(prompt) + len(response) + 1:
            truncated += 1
        if len(input_ids) <= len(prompt):
            dropped += 1
            continue
        prompt_labels = prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
        labels = prompt_labels + input_ids[len(prompt) :]
        examples.append(TokenizedExample(input_ids, labels, record.category))
    return examples, TruncationReport(len(records), truncated, dropped)
