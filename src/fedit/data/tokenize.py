"""Turn records into token ids and loss labels for supervised fine-tuning.

Each example is ``prompt + response`` closed as the template closes a turn
(``fedit.data.templates.response_frame``: the chat template's end-of-turn token, or eos),
tokenised as one text: a tokenizer splits ``prompt + response`` differently from the two
parts apart (a SentencePiece tokenizer puts ▁ before the first word of any text tokenised
on its own), and the model must learn the tokens it will see. Labels are -100 (ignored by
the loss) on prompt tokens unless ``train_on_prompt``, and the token ids on the response
and its end token. No special tokens are added: no BOS for alpaca (kept simple and the
same for every tokenizer), and the chat template already writes its own specials into
the prompt text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedit.data.records import Record
from fedit.data.templates import render_prompt, response_frame

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def split_whole_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], continuations: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, continuation ids) per text pair, which together are the tokenisation
    of prompt + continuation as one text.

    The boundary is where that tokenisation stops agreeing with the prompt's own: after
    the whole prompt (the ids generation feeds), or earlier when a token spans the join
    (it then belongs to the continuation, the part the loss is on).
    """
    prompt_ids = _batch_ids(tokenizer, list(prompts))
    wholes = _batch_ids(tokenizer, [p + c for p, c in zip(prompts, continuations, strict=True)])
    pieces = []
    for prompt, whole in zip(prompt_ids, wholes, strict=True):
        n = common_prefix_len(prompt, whole)
        pieces.append((whole[:n], whole[n:]))
    return pieces


def common_prefix_len(first: Sequence, second: Sequence) -> int:
    """How many leading items (characters, token ids) two sequences share."""
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return index
    return min(len(first), len(second))


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
    frame = response_frame(template, tokenizer)
    prompts = [render_prompt(r, template, tokenizer, system_prompt) for r in records]
    responses = [frame.before + r.response + frame.after for r in records]
    pieces = split_whole_texts(tokenizer, prompts, responses)
    examples: list[TokenizedExample] = []
    truncated = dropped = 0
    for record, (prompt, response) in zip(records, pieces, strict=True):
        input_ids = (prompt + response + [frame.end_id])[:max_seq_len]
        if len(input_ids) < len(prompt) + len(response) + 1:
            truncated += 1
        if len(input_ids) <= len(prompt):
            dropped += 1
            continue
        prompt_labels = prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
        labels = prompt_labels + input_ids[len(prompt) :]
        examples.append(TokenizedExample(input_ids, labels, record.category))
    return examples, TruncationReport(len(records), truncated, dropped)
