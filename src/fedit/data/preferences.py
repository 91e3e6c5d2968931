"""Preference pairs for DPO: read them, tokenise them within length limits, collate them.

Three record formats, detected per record with ``format="auto"``:

* ``plain``: ``{"prompt": str, "chosen": str, "rejected": str, "category"?: str}``.
* ``hh`` (Anthropic HH-RLHF): ``chosen`` and ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share their opening turns; the prompt is
  their longest shared prefix up to and including the last ``"\\n\\nAssistant:"`` both share.
* ``ultrafeedback`` (UltraFeedback-binarized): ``prompt`` is a string, ``chosen`` and
  ``rejected`` are lists of ``{"role", "content"}`` messages: the prompt as a user turn,
  then the response as an assistant turn (or the assistant turn alone).

Conversations (more turns than one question and its answer, a system turn, a prompt given
as a message list, OpenAI ``messages`` or ShareGPT ``conversations``) are refused, naming
the field: read as one prompt and one response they would train the last answer against
another question.

Responses are stripped of surrounding whitespace in every format; prompts are kept verbatim
(the prompt template, applied at tokenisation, decides what separates prompt and response).
Every malformed pair raises ``DataFormatError`` naming the file, the line and the field in
the format of ``fedit.data.readers`` (``prefs.jsonl:17: field 'rejected': missing``), so a
bad record in a client's shard fails loudly instead of as a ``KeyError`` mid-training.
``synthetic_pairs`` builds checkable pairs from the synthetic skills for demos and tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedit.config import PREFERENCE_FORMATS
from fedit.data.readers import CONVERSATIONS_UNSUPPORTED, iter_rows, refuse_conversation
from fedit.data.records import DataFormatError
from fedit.data.synthetic import generate_records, wrong_answer
from fedit.data.templates import ResponseFrame
from fedit.data.tokenize import common_prefix_len, split_whole_texts

if TYPE_CHECKING:
    from torch import Tensor

FORMATS = PREFERENCE_FORMATS
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "Human:"
IGNORE_INDEX = -100  # label value that cross-entropy and sequence_logps skip

Row = dict[str, Any]


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: str
    chosen: str
    rejected: str
    category: str = "default"


# ---------------------------------------------------------------------------- reading


def read_preferences(
    source: str, format: str = "auto", split: str = "train"
) -> list[PreferencePair]:
    """Read preference pairs from a .json (list), .jsonl or .csv file, or a Hub dataset.

    ``format`` is one of ``FORMATS``; ``"auto"`` detects each record's format by its keys.
    Rows come from ``fedit.data.readers.iter_rows``, so errors name the row the way record
    errors do: ``path:LINE: field 'x': ...``, ``path: item N: ...`` (JSON lists, 1-based).
    A source that is not a file path is loaded with ``datasets.load_dataset`` (``split``
    selects the split, e.g. ``"train_prefs"`` for UltraFeedback-binarized).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown preference format {format!r}; expected one of {FORMATS}")
    pairs = [parse_pair(row, format, where) for where, row in iter_rows(source, split)]
    if not pairs:
        raise DataFormatError(f"{source}: no preference pairs")
    return pairs


def synthetic_pairs(per_skill: int, seed: int) -> list[PreferencePair]:
    """Pairs from the synthetic skills: chosen = the right answer, rejected = a wrong one.

    The records are ``generate_records(per_skill, seed)``, the same ones ``data.path =
    "synthetic"`` gives, in the same order, so with the same seed the held-out split picks
    the same prompts for both. Wrong answers come from one generator seeded by ``seed``.
    """
    rng = random.Random(f"{seed}:preferences")
    return [
        PreferencePair(r.instruction, r.response, wrong_answer(r, rng), r.category)
        for r in generate_records(per_skill, seed)
    ]


# ---------------------------------------------------------------------------- parsing


def _error(where: str, field: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{where}: field '{field}': {problem}")


def detect_format(row: Row) -> str:
    """Guess a record's format from its keys: "plain", "hh", "ultrafeedback" or "" (unknown)."""
    if "prompt" in row:
        return "ultrafeedback" if isinstance(row.get("chosen"), list) else "plain"
    if isinstance(row.get("chosen"), str) and ASSISTANT_MARKER in row["chosen"]:
        return "hh"
    return ""


def parse_pair(row: Any, format: str, where: str = "record") -> PreferencePair:
    """Turn one raw record into a validated ``PreferencePair`` (``format`` may be "auto")."""
    if not isinstance(row, dict):
        raise _error(where, "(record)", f"expected an object, got {type(row).__name__}")
    if format == "auto":
        format = detect_format(row)
        if not format:
            refuse_conversation(row, where)  # the likelier reason it has no prompt
            raise _error(where, "prompt", "missing (and chosen is not an HH dialogue)")
    parsers = {"plain": _parse_plain, "hh": _parse_hh, "ultrafeedback": _parse_ultrafeedback}
    prompt, chosen, rejected = parsers[format](row, where)
    if not chosen:
        raise _error(where, "chosen", "empty response")
    if not rejected:
        raise _error(where, "rejected", "empty response")
    if chosen == rejected:
        raise _error(where, "rejected", "identical to chosen")
    category = _field(row, "category", where, default="default")
    return PreferencePair(prompt, chosen, rejected, category or "default")


def _field(row: Row, name: str, where: str, default: str | None = None) -> str:
    """A string field; missing (or null) is an error unless ``default`` is given."""
    value = row.get(name)
    if value is None:
        if default is None:
            raise _error(where, name, "missing")
        return default
    if isinstance(value, list):  # e.g. TRL's conversational prompt: a message list
        raise _error(where, name, f"a message list: {CONVERSATIONS_UNSUPPORTED}")
    if not isinstance(value, str):
        raise _error(where, name, f"expected a string, got {type(value).__name__}")
    return value


def _parse_plain(row: Row, where: str) -> tuple[str, str, str]:
    prompt = _field(row, "prompt", where)
    chosen = _field(row, "chosen", where).strip()
    rejected = _field(row, "rejected", where).strip()
    return prompt, chosen, rejected


def _parse_hh(row: Row, where: str) -> tuple[str, str, str]:
    """Split two HH dialogues at the last "\\n\\nAssistant:" of their shared prefix."""
    chosen = _field(row, "chosen", where)
    rejected = _field(row, "rejected", where)
    shared = common_prefix_len(chosen, rejected)
    cut = chosen.rfind(ASSISTANT_MARKER, 0, shared)
    if cut < 0 or HUMAN_MARKER not in chosen[:cut]:
        raise _error(where, "chosen", "no shared Human/Assistant prefix with rejected")
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def _parse_ultrafeedback(row: Row, where: str) -> tuple[str, str, str]:
    prompt = _field(row, "prompt", where)
    chosen = _final_assistant(row, "chosen", prompt, where)
    rejected = _final_assistant(row, "rejected", prompt, where)
    return prompt, chosen, rejected


def _final_assistant(row: Row, name: str, prompt: str, where: str) -> str:
    """Content of the final message of an UltraFeedback list; it must be the assistant's,
    after nothing but the prompt as the user's turn."""
    messages = row.get(name)
    if messages is None:
        raise _error(where, name, "missing")
    if not isinstance(messages, list):
        raise _error(where, name, f"expected a message list, got {type(messages).__name__}")
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise _error(where, name, "message list has no final assistant turn")
    content = last.get("content")
    if not isinstance(content, str):
        raise _error(where, name, "final assistant message has no string content")
    _check_single_turn(messages[:-1], name, prompt, where)
    return content.strip()


def _check_single_turn(before: list, name: str, prompt: str, where: str) -> None:
    """The turns before the response may only be the prompt, as one user turn."""
    if len(before) > 1 or (before and not isinstance(before[0], dict)):
        raise _error(where, name, f"multi-turn message list: {CONVERSATIONS_UNSUPPORTED}")
    if not before:
        return
    first = before[0]
    if first.get("role") != "user":
        raise _error(where, name, f"multi-turn message list: {CONVERSATIONS_UNSUPPORTED}")
    content = first.get("content")
    if not isinstance(content, str) or content.strip() != prompt.strip():
        raise _error(where, name, "the user turn differs from field 'prompt'")


# ---------------------------------------------------------------------------- tokenising


@dataclass
class TokenizedPair:
    """Token ids of one pair: the (rendered) prompt and each response ending in eos."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    category: str = "default"


@dataclass
class PairTruncationReport:
    """What the length limits did: ``total`` pairs in, ``dropped`` of them left out.

    ``prompt_truncated`` and ``response_truncated`` count kept pairs (a pair counts once
    even if both its responses were cut); ``dropped`` pairs had a response with no token
    left once the prompt took its share of ``max_total_len``.
    """

    total: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped: int = 0

    def __add__(self, other: PairTruncationReport) -> PairTruncationReport:
        return PairTruncationReport(
            self.total + other.total,
            self.prompt_truncated + other.prompt_truncated,
            self.response_truncated + other.response_truncated,
            self.dropped + other.dropped,
        )

    def summary(self) -> str:
        return (
            f"{self.total} preference pairs: {self.prompt_truncated} prompts cut to "
            f"dpo.max_prompt_len, {self.response_truncated} responses cut to data.max_seq_len, "
            f"{self.dropped} dropped (no response token left)"
        )


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    max_prompt_len: int,
    max_total_len: int,
    render_prompt: Callable[[str], str] | None = None,
    frame: ResponseFrame | None = None,
) -> tuple[list[TokenizedPair], PairTruncationReport]:
    """Tokenise pairs so each prompt ≤ ``max_prompt_len`` and prompt + response ≤ ``max_total_len``.

    The prompt text goes through ``render_prompt`` (a template; identity by default). Each
    response is closed by ``frame`` (``fedit.data.templates.response_frame``; default: eos
    only) and tokenised with its prompt as one text, as SFT records are
    (``fedit.data.tokenize.split_whole_texts``), without special tokens. A long prompt
    keeps its *last* ``max_prompt_len`` tokens: the end of the prompt (the latest turn and
    the template's response cue) is what the response depends on most. Each response is
    cut from the end to fit the budget left by its prompt; a cut response loses its end
    token, so the model is not taught to stop where the limit fell.
    """
    if max_prompt_len < 0 or max_total_len < 1:
        limits = f"max_prompt_len={max_prompt_len}, max_total_len={max_total_len}"
        raise ValueError(f"need max_prompt_len >= 0 and max_total_len >= 1, got {limits}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; responses must end with one")
    frame = frame or ResponseFrame("", "", tokenizer.eos_token_id)
    render = render_prompt or (lambda text: text)
    prompts = [render(pair.prompt) for pair in pairs]
    chosens = split_whole_texts(tokenizer, prompts, [_framed(p.chosen, frame) for p in pairs])
    rejecteds = split_whole_texts(tokenizer, prompts, [_framed(p.rejected, frame) for p in pairs])
    report = PairTruncationReport(total=len(pairs))
    kept: list[TokenizedPair] = []
    for pair, chosen, rejected in zip(pairs, chosens, rejecteds, strict=True):
        full = _shared_prompt(chosen, rejected, frame.end_id, pair.category)
        fitted = fit_lengths(full, max_prompt_len, max_total_len)
        if fitted is None:
            report.dropped += 1
            continue
        report.prompt_truncated += len(fitted.prompt_ids) < len(full.prompt_ids)
        report.response_truncated += fitted.chosen_ids != full.chosen_ids or (
            fitted.rejected_ids != full.rejected_ids
        )
        kept.append(fitted)
    return kept, report


def _framed(response: str, frame: ResponseFrame) -> str:
    return frame.before + response + frame.after


def _shared_prompt(
    chosen: tuple[list[int], list[int]],
    rejected: tuple[list[int], list[int]],
    end_id: int,
    category: str,
) -> TokenizedPair:
    """One pair from each response's (prompt ids, response ids) split: the prompt is what
    both splits share (they differ only when a token spans a join), the rest response."""
    (chosen_prompt, chosen_ids), (rejected_prompt, rejected_ids) = chosen, rejected
    n = common_prefix_len(chosen_prompt, rejected_prompt)
    return TokenizedPair(
        chosen_prompt[:n],
        [*chosen_prompt[n:], *chosen_ids, end_id],
        [*rejected_prompt[n:], *rejected_ids, end_id],
        category,
    )


def fit_lengths(
    pair: TokenizedPair, max_prompt_len: int, max_total_len: int
) -> TokenizedPair | None:
    """Keep the prompt's last ``max_prompt_len`` ids, then cut each response to fit the total.

    Returns None when the prompt leaves a response no room at all (the pair is dropped).
    """
    prompt = pair.prompt_ids[max(len(pair.prompt_ids) - max_prompt_len, 0) :]
    budget = max(max_total_len - len(prompt), 0)
    chosen, rejected = pair.chosen_ids[:budget], pair.rejected_ids[:budget]
    if not chosen or not rejected:
        return None
    return TokenizedPair(prompt, chosen, rejected, pair.category)


# ---------------------------------------------------------------------------- collating


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, Tensor]:
    """Batch B pairs as 2B right-padded rows (chosen rows first, then rejected) for one forward.

    One concatenated pass gives the policy (and the reference) both responses' log-probs at
    once. ``labels`` are the response tokens, −100 on the prompt and the padding; T is the
    longest row in this batch (dynamic padding). Returns input_ids, attention_mask, labels.
    """
    import torch  # here, so reading and preparing pairs (the CLI) does not load torch

    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    responses = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    prompts = [pair.prompt_ids for pair in pairs] * 2
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    input_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(responses), width), dtype=torch.long)
    labels = torch.full((len(responses), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(response, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
