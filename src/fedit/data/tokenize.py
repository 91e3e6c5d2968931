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

from fedit.data.conversations import chat_messages
from fedit.data.records import Record
from fedit.data.templates import NO_TURNS, ResponseFrame, render_prompt, response_frame

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
    turns: str = "all",
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Tokenise records into training examples, truncating each to max_seq_len.

    Truncation cuts from the end. A record whose prompt alone fills max_seq_len keeps no
    response token (a conversation: no token of a trained assistant turn), so it is
    dropped rather than trained on, and counted in the report. A conversation's loss is on
    its assistant turns (`turns`: "all" or "last", see ``conversation_tokens``).
    """
    frame = response_frame(template, tokenizer)
    single = [r for r in records if not r.history]
    prompts = [render_prompt(r, template, tokenizer, system_prompt) for r in single]
    responses = [frame.before + r.response + frame.after for r in single]
    pieces = iter(split_whole_texts(tokenizer, prompts, responses))
    examples: list[TokenizedExample] = []
    truncated = dropped = 0
    for record in records:
        if record.history and template != "chat":
            raise ValueError(f"data.template: {NO_TURNS}")
        if record.history:
            ids, trained = conversation_tokens(record, tokenizer, frame, system_prompt, turns)
        else:
            prompt, response = next(pieces)
            ids = prompt + response + [frame.end_id]
            trained = [False] * len(prompt) + [True] * (len(response) + 1)
        truncated += len(ids) > max_seq_len
        ids, trained = ids[:max_seq_len], trained[:max_seq_len]
        if not any(trained):
            dropped += 1
            continue
        masked = [t if on else IGNORE_INDEX for t, on in zip(ids, trained, strict=True)]
        labels = list(ids) if train_on_prompt else masked
        examples.append(TokenizedExample(ids, labels, record.category))
    return examples, TruncationReport(len(records), truncated, dropped)


def conversation_tokens(
    record: Record,
    tokenizer: PreTrainedTokenizerBase,
    frame: ResponseFrame,
    system_prompt: str | None,
    turns: str = "all",
) -> tuple[list[int], list[bool]]:
    """(ids of the whole conversation as the chat template renders it, which of them carry
    loss): every assistant turn's, or only the last's (`turns` = "last"), each with its
    end-of-turn token, never a system or user token.

    A turn's span is found by rendering prefixes, as a single-turn response's is: it starts
    where the ids stop agreeing with those of the conversation rendered up to that turn's
    generation prompt, and ends after the ids of that prefix + the turn + its end token.
    A template that renders an earlier turn differently from how it rendered it as the
    last (one that drops earlier reasoning) has no such spans, and is refused.
    """
    messages = chat_messages(record, system_prompt)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    end_text = tokenizer.convert_ids_to_tokens(frame.end_id)
    replies = [n for n, m in enumerate(messages) if m["role"] == "assistant"]
    bounds: list[str] = []
    for n in replies[-1:] if turns == "last" else replies:
        prompt = tokenizer.apply_chat_template(
            messages[:n], tokenize=False, add_generation_prompt=True
        )
        turn = prompt + frame.before + messages[n]["content"] + frame.after + end_text
        if not whole.startswith(turn):
            raise ValueError(
                f"the chat template does not render assistant turn {n} of a conversation "
                f"as it renders a reply closed by {end_text!r}; fedit cannot tell which "
                "tokens are that turn's"
            )
        bounds += [prompt, turn]
    ids, *bound_ids = _batch_ids(tokenizer, [whole, *bounds])
    trained = [False] * len(ids)
    for start_ids, stop_ids in zip(bound_ids[::2], bound_ids[1::2], strict=True):
        start, stop = common_prefix_len(start_ids, ids), common_prefix_len(stop_ids, ids)
        trained[start:stop] = [True] * (stop - start)
    return ids, trained
