"""Preference pairs for DPO: read them, tokenise them within length limits, collate them.

Four record formats, detected per record with ``format="auto"``:

* ``plain``: ``{"prompt": str, "chosen": str, "rejected": str, "category"?: str}``; other
  key names through a field map (``data.preference_fields``, ``parse_preference_fields``).
* ``hh`` (Anthropic HH-RLHF): ``chosen`` and ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share their opening turns; the prompt is
  their longest shared prefix up to and including the last ``"\\n\\nAssistant:"`` both share,
  kept as that text (for one-turn templates) and as its Human/Assistant turns (for "chat").
* ``ultrafeedback`` (UltraFeedback-binarized): ``prompt`` is a string, ``chosen`` and
  ``rejected`` are lists of ``{"role", "content"}`` messages: the conversation, then the
  response as the final assistant turn (or the assistant turn alone).
* ``conversational`` (TRL's): ``prompt`` is a list of messages (system / user / assistant,
  any number of turns, ending with the user's) and ``chosen`` / ``rejected`` each one
  assistant message; or, the "implicit prompt" form, no ``prompt`` and ``chosen`` /
  ``rejected`` two whole conversations whose shared messages are the prompt.

A prompt of more than one user turn (a system turn, earlier exchanges) is kept as turns
(``PreferencePair.turns``) and needs ``data.template = "chat"``, which renders every turn
in its role; the one-turn "alpaca" template refuses it at tokenisation.

Responses are stripped of surrounding whitespace in every format; prompts are kept verbatim
(the prompt template, applied at tokenisation, decides what separates prompt and response).
Every malformed pair raises ``DataFormatError`` naming the file, the line and the field in
the format of ``fedit.data.readers`` (``prefs.jsonl:17: field 'rejected': missing``), so a
bad record in a client's shard fails loudly instead of as a ``KeyError`` mid-training.
``synthetic_pairs`` builds checkable pairs from the synthetic skills for demos and tests.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedit.config import PREFERENCE_FORMATS
from fedit.config.data import parse_preference_fields
from fedit.data.readers import iter_rows
from fedit.data.records import DataFormatError
from fedit.data.synthetic import generate_records, wrong_answer
from fedit.data.templates import ResponseFrame
from fedit.data.tokenize import common_prefix_len, split_whole_texts

if TYPE_CHECKING:
    from torch import Tensor

FORMATS = PREFERENCE_FORMATS
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "Human:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")  # where each HH dialogue turn starts
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that cross-entropy and sequence_logps skip

Row = dict[str, Any]
Turns = tuple[tuple[str, str], ...]  # (role, content) messages
Parsed = tuple[str, Turns, str, str]  # prompt text, prompt turns, chosen, rejected


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: str  # the prompt as one text ("" when it is a conversation with no such form)
    chosen: str
    rejected: str
    category: str = "default"
    # the prompt as (role, content) turns ending with the user's, when it is more than one
    # user turn (or an HH dialogue): what data.template = "chat" renders
    turns: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        """The prompt conversation as chat-template messages."""
        turns = self.turns or (("user", self.prompt),)
        return [{"role": role, "content": content} for role, content in turns]


# ---------------------------------------------------------------------------- reading


def read_preferences(
    source: str, format: str = "auto", split: str = "train", fields: str = ""
) -> list[PreferencePair]:
    """Read preference pairs from a .json (list), .jsonl or .csv file, or a Hub dataset.

    ``format`` is one of ``FORMATS``; ``"auto"`` detects each record's format by its keys.
    Rows come from ``fedit.data.readers.iter_rows``, so errors name the row the way record
    errors do: ``path:LINE: field 'x': ...``, ``path: item N: ...`` (JSON lists, 1-based).
    A source that is not a file path is loaded with ``datasets.load_dataset`` (``split``
    selects the split, e.g. ``"train_prefs"`` for UltraFeedback-binarized). ``fields`` is
    ``data.preference_fields``, a field map of plain pairs.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown preference format {format!r}; expected one of {FORMATS}")
    mapping = parse_preference_fields(fields)
    pairs = [parse_pair(row, format, where, mapping) for where, row in iter_rows(source, split)]
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
    """Guess a record's format from its keys: one of ``FORMATS`` but "auto", or "" (unknown)."""
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if isinstance(prompt, list) or (prompt is None and isinstance(chosen, list)):
        return "conversational"
    if "prompt" in row:
        return "ultrafeedback" if isinstance(chosen, list) else "plain"
    if isinstance(chosen, str) and ASSISTANT_MARKER in chosen:
        return "hh"
    return ""


def parse_pair(
    row: Any, format: str, where: str = "record", fields: dict[str, str] | None = None
) -> PreferencePair:
    """Turn one raw record into a validated ``PreferencePair`` (``format`` may be "auto").

    ``fields`` ({fedit's name: the record's key}, ``parse_preference_fields``) renames the
    record's keys first, so errors name fedit's field."""
    if not isinstance(row, dict):
        raise _error(where, "(record)", f"expected an object, got {type(row).__name__}")
    if fields:
        row = {name: row.get(key) for name, key in fields.items()}
    if format == "auto":
        format = detect_format(row)
        if not format:
            known = ", ".join(f for f in FORMATS if f != "auto")
            raise _error(
                where,
                "prompt",
                f"missing, and chosen is neither an HH dialogue nor a message list; no "
                f"preference format fits (known: {known}; see docs/configuration.md)",
            )
    parsers = {
        "plain": _parse_plain,
        "hh": _parse_hh,
        "ultrafeedback": _parse_ultrafeedback,
        "conversational": _parse_conversational,
    }
    prompt, turns, chosen, rejected = parsers[format](row, where)
    if not chosen:
        raise _error(where, "chosen", "empty response")
    if not rejected:
        raise _error(where, "rejected", "empty response")
    if chosen == rejected:
        raise _error(where, "rejected", "identical to chosen")
    category = _field(row, "category", where, default="default")
    return PreferencePair(prompt, chosen, rejected, category or "default", turns)


def _field(row: Row, name: str, where: str, default: str | None = None) -> str:
    """A string field; missing (or null) is an error unless ``default`` is given."""
    value = row.get(name)
    if value is None:
        if default is None:
            raise _error(where, name, "missing")
        return default
    if isinstance(value, list):
        raise _error(where, name, "a message list: use preference_format 'conversational'")
    if not isinstance(value, str):
        raise _error(where, name, f"expected a string, got {type(value).__name__}")
    return value


def _parse_plain(row: Row, where: str) -> Parsed:
    prompt = _field(row, "prompt", where)
    return prompt, (), _field(row, "chosen", where).strip(), _field(row, "rejected", where).strip()


def _parse_hh(row: Row, where: str) -> Parsed:
    """Split two HH dialogues at the last "\\n\\nAssistant:" of their shared prefix."""
    chosen = _field(row, "chosen", where)
    rejected = _field(row, "rejected", where)
    shared = common_prefix_len(chosen, rejected)
    cut = chosen.rfind(ASSISTANT_MARKER, 0, shared)
    if cut < 0 or HUMAN_MARKER not in chosen[:cut]:
        raise _error(where, "chosen", "no shared Human/Assistant prefix with rejected")
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], _hh_turns(chosen[:cut]), chosen[end:].strip(), rejected[end:].strip()


def _hh_turns(dialogue: str) -> Turns:
    """The (role, content) turns of an HH dialogue; text before its first turn is dropped."""
    pieces = HH_TURN.split(dialogue)[1:]  # [speaker, text, speaker, text, ...]
    return tuple(
        (HH_ROLES[speaker], text.strip())
        for speaker, text in zip(pieces[::2], pieces[1::2], strict=True)
    )


def _parse_ultrafeedback(row: Row, where: str) -> Parsed:
    """``prompt`` a string; the lists are the conversation, then the response (or the
    response alone, the prompt then its one user turn). A conversation must have
    ``prompt`` as one of its user turns."""
    prompt = _field(row, "prompt", where)
    chosen, rejected = (
        _with_prompt(_messages(row, name, where), prompt) for name in ("chosen", "rejected")
    )
    turns, chosen_text, rejected_text = _split_conversations(chosen, rejected, where)
    _check_prompt_turns(turns, where)
    if prompt.strip() not in [content.strip() for role, content in turns if role == "user"]:
        raise _error(where, "chosen", "the user turn differs from field 'prompt'")
    turns = _keep_turns(turns)
    return ("" if turns else prompt), turns, chosen_text, rejected_text


def _parse_conversational(row: Row, where: str) -> Parsed:
    """TRL's conversational pairs: explicit (``prompt`` a message list, the responses one
    assistant message each) or implicit (no ``prompt``; two conversations sharing it)."""
    chosen, rejected = _messages(row, "chosen", where), _messages(row, "rejected", where)
    if row.get("prompt") is None:
        turns, chosen_text, rejected_text = _split_conversations(chosen, rejected, where)
        if not turns:
            raise _error(where, "chosen", "shares no prompt turn with rejected (and no 'prompt')")
    else:
        turns = _messages(row, "prompt", where)
        chosen_text = _one_reply(chosen, "chosen", where)
        rejected_text = _one_reply(rejected, "rejected", where)
    _check_prompt_turns(turns, where)
    kept = _keep_turns(turns)
    return ("" if kept else turns[0][1]), kept, chosen_text, rejected_text


def _messages(row: Row, name: str, where: str) -> Turns:
    """A field holding a list of {"role", "content"} messages, as (role, content) turns."""
    messages = row.get(name)
    if messages is None:
        raise _error(where, name, "missing")
    if not isinstance(messages, list):
        raise _error(where, name, f"expected a message list, got {type(messages).__name__}")
    turns = []
    for i, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise _error(
                where,
                name,
                f"message {i}: expected {{'role': system|user|assistant, "
                f"'content': str}}, got {message!r:.60}",
            )
        turns.append((role, content))
    return tuple(turns)


def _split_conversations(chosen: Turns, rejected: Turns, where: str) -> tuple[Turns, str, str]:
    """(prompt turns, chosen reply, rejected reply) of two whole conversations that differ
    only in their final assistant message (TRL's implicit prompt)."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1][0] != "assistant":
            raise _error(where, name, "message list has no final assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise _error(
            where,
            "rejected",
            "its turns before the final reply differ from chosen's; both must answer the "
            "same conversation (multi-message responses are not supported)",
        )
    return chosen[:-1], chosen[-1][1].strip(), rejected[-1][1].strip()


def _with_prompt(messages: Turns, prompt: str) -> Turns:
    """An UltraFeedback list of the answer alone gets the prompt as its user turn."""
    alone = len(messages) == 1 and messages[0][0] == "assistant"
    return (("user", prompt), *messages) if alone else messages


def _one_reply(messages: Turns, name: str, where: str) -> str:
    if len(messages) != 1 or messages[0][0] != "assistant":
        raise _error(
            where,
            name,
            "the response must be one assistant message after the prompt's turns "
            f"(got {len(messages)} message(s)); multi-message responses are not supported",
        )
    return messages[0][1].strip()


def _check_prompt_turns(turns: Turns, where: str) -> None:
    """A prompt conversation: a system turn first if any, ending with the user's turn."""
    if not turns or turns[-1][0] != "user":
        raise _error(where, "prompt", "the conversation must end with a user turn")
    if any(role == "system" for role, _ in turns[1:]):
        raise _error(where, "prompt", "a system turn is allowed only as the first message")


def _keep_turns(turns: Turns) -> Turns:
    """The turns to keep: none when the prompt is one user turn (its text says it all)."""
    return () if len(turns) == 1 and turns[0][0] == "user" else turns


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
    render_prompt: Callable[[PreferencePair], str] | None = None,
    frame: ResponseFrame | None = None,
) -> tuple[list[TokenizedPair], PairTruncationReport]:
    """Tokenise pairs so each prompt ≤ ``max_prompt_len`` and prompt + response ≤ ``max_total_len``.

    Each pair's prompt is rendered by ``render_prompt`` (a template; default: the prompt
    text as it is). Each
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
    render = render_prompt or (lambda pair: pair.prompt)
    prompts = [render(pair) for pair in pairs]
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
