"""Conversation data (fedit.data.conversations): read, rendered with the chat template,
and labelled token by token (loss on assistant turns only)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from fedit.attacks.data import plant_backdoor
from fedit.config import ConfigError
from fedit.config.toml_read import build_config
from fedit.data.prepare import prepare_records
from fedit.data.readers import read_records, write_records_jsonl
from fedit.data.records import DataFormatError, Record
from fedit.data.synthetic import CHAT_SYSTEM_PROMPT, SKILL_NAMES, generate_conversations
from fedit.data.templates import render_prompt
from fedit.data.tokenize import IGNORE_INDEX, tokenize_records
from fedit.models.tiny import byte_tokenizer
from tests.conftest import chatml_base_tokenizer, gemma_like_tokenizer

SYSTEM = "You are a terse arithmetic tutor."
EXCHANGES = [("What is 2+3?", "5"), ("And times 4?", "It is 20."), ("Minus 6?", "14")]
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    *(
        turn
        for q, a in EXCHANGES
        for turn in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ),
]
HISTORY = tuple((m["role"], m["content"]) for m in MESSAGES[:-2])  # before the last exchange
SHAREGPT = [
    {
        "from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
        "value": m["content"],
    }
    for m in MESSAGES
]


def write_jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def expected_tokens(tokenizer, system: str, last_only: bool) -> tuple[list[int], list[int]]:
    """The ChatML rendering written out by hand, piece by piece: only each trained
    assistant reply and its <|im_end|> carry labels (the byte tokenizer has no merges, so
    the pieces' ids concatenate to the whole text's)."""
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for n, (question, answer) in enumerate(EXCHANGES):
        trained = not last_only or n == len(EXCHANGES) - 1
        pieces += [
            (f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{answer}<|im_end|>", trained),
            ("\n", False),
        ]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


@pytest.mark.parametrize("turns", ["all", "last"])
def test_a_multi_turn_conversation_is_labelled_token_by_token(tmp_path: Path, turns: str) -> None:
    tokenizer = byte_tokenizer()
    records = read_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}]))
    (example,), report = tokenize_records(records, tokenizer, "chat", 512, turns=turns)
    ids, labels = expected_tokens(tokenizer, SYSTEM, last_only=turns == "last")
    assert example.input_ids == ids
    assert example.labels == labels
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    replies = [a for _, a in EXCHANGES] if turns == "all" else [EXCHANGES[-1][1]]
    assert trained == "".join(f"{a}<|im_end|>" for a in replies)
    assert (report.truncated, report.dropped) == (0, 0)


def test_sharegpt_reads_as_the_same_record_and_tokens(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    openai = read_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": MESSAGES}]))
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": SHAREGPT}]))  # a JSON list
    sharegpt = read_records(str(tmp_path / "s.json"))
    assert sharegpt == openai
    assert openai[0] == Record("Minus 6?", "14", "", "conversation", HISTORY)
    a, _ = tokenize_records(openai, tokenizer, "chat", 512)
    b, _ = tokenize_records(sharegpt, tokenizer, "chat", 512)
    assert (a[0].input_ids, a[0].labels) == (b[0].input_ids, b[0].labels)


def test_the_record_system_turn_wins_over_data_system_prompt(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    no_system = {"messages": MESSAGES[1:], "category": "math"}
    own, plain = read_records(
        write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}, no_system])
    )
    assert plain.category == "math"
    examples, _ = tokenize_records([own, plain], tokenizer, "chat", 512, system_prompt="Other.")
    assert (examples[0].input_ids, examples[0].labels) == expected_tokens(tokenizer, SYSTEM, False)
    assert (examples[1].input_ids, examples[1].labels) == expected_tokens(
        tokenizer, "Other.", False
    )


def test_the_prompt_of_a_conversation_is_every_turn_before_its_last_reply(tmp_path: Path) -> None:
    (record,) = read_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}]))
    prompt = render_prompt(record, "chat", byte_tokenizer())
    assert prompt.endswith("<|im_start|>user\nMinus 6?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n") and "20" in prompt


def test_truncation_counts_and_drops_as_for_single_turn_records(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    records = read_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}]))
    ids, _ = expected_tokens(tokenizer, SYSTEM, False)
    cut = len(ids) - 20  # inside the last user turn: the first two replies are kept
    (example,), report = tokenize_records(records, tokenizer, "chat", cut)
    assert len(example.input_ids) == cut and (report.truncated, report.dropped) == (1, 0)
    kept, report = tokenize_records(records, tokenizer, "chat", cut, turns="last")
    assert kept == [] and (report.truncated, report.dropped) == (1, 1)


def turns_with(n: int, **turn: object) -> list[dict]:
    return [*MESSAGES[:n], turn, *MESSAGES[n + 1 :]]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (turns_with(3, role="bot", content="Yo"), "field 'messages[3].role': unknown role 'bot'"),
        (turns_with(2, role="assistant", content=" "), "field 'messages[2].content': empty"),
        (turns_with(2, role="assistant"), "field 'messages[2].content': expected a string"),
        (MESSAGES[:2], "field 'messages': no assistant turn to train on"),
        (
            [*MESSAGES[:3], MESSAGES[2]],
            "field 'messages[3]': a assistant turn where the user's is expected",
        ),
        (
            [MESSAGES[1], MESSAGES[1]],
            "field 'messages[1]': a user turn where the assistant's is expected",
        ),
        (
            [*MESSAGES[1:3], MESSAGES[0], *MESSAGES[3:]],
            "field 'messages[2]': a system turn where the user's is expected (a system turn "
            "may only come first)",
        ),
        (MESSAGES[:4], "field 'messages[3]': the last turn is the user's"),
        ([*MESSAGES[:2], "hi"], "field 'messages[2]': expected an object per turn"),
        ([], "field 'messages': missing or empty"),
    ],
)
def test_a_malformed_turn_is_one_line_naming_file_line_and_field(
    tmp_path: Path, messages: list, message: str
) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}, {"messages": messages}])
    with pytest.raises(DataFormatError, match=rf"^{re.escape(path)}:2: {re.escape(message)}"):
        read_records(path)


def test_a_sharegpt_turn_names_its_own_fields(tmp_path: Path) -> None:
    bad = [*SHAREGPT[:3], {"from": "bard", "value": "x"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": SHAREGPT}, {"conversations": bad}])
    with pytest.raises(DataFormatError, match=r"s\.jsonl:2: field 'conversations\[3\]\.from'"):
        read_records(path)


def test_a_record_of_no_known_format_names_the_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(DataFormatError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:1: field 'instruction': missing")
    for name in ("dolly", "alpaca", "field map", "messages", "sharegpt"):
        assert name in str(err.value)


def run_config(path: str, *overrides: str):
    return build_config(
        {}, [f'data.path="{path}"', "partition.num_clients=2", *overrides]
    ).validate()


def test_conversations_under_the_alpaca_template_are_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}] * 4)
    with pytest.raises(ConfigError, match="data.template: 'alpaca' has one prompt and one "):
        prepare_records(run_config(path, "data.template=alpaca"))
    with pytest.raises(ValueError, match="'alpaca' has one prompt"):
        tokenize_records(read_records(path), byte_tokenizer(), "alpaca", 512)
    with pytest.raises(ConfigError, match="data.template: 'alpaca' has one prompt"):
        prepare_records(run_config("synthetic_chat", "data.synthetic_per_skill=2"))


def test_conversations_are_one_category_and_split_like_records(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "a"}]}
        for n in range(8)
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = run_config(path, "data.template=chat", "data.heldout_per_category=2")
    prepared = prepare_records(cfg)
    assert len(prepared.heldout) == 2 and len(prepared.train) == 6
    assert {r.category for r in prepared.train + prepared.heldout} == {"conversation"}


def test_synthetic_chat_is_two_skills_per_conversation_after_a_system_turn() -> None:
    records = generate_conversations(per_skill=3, seed=0)
    assert len(records) == 3 * len(SKILL_NAMES)
    assert records == generate_conversations(per_skill=3, seed=0)
    first = records[0]
    assert [role for role, _ in first.history] == ["system", "user", "assistant"]
    assert first.history[0] == ("system", CHAT_SYSTEM_PROMPT)
    assert first.category == SKILL_NAMES[0]
    examples, _ = tokenize_records(records, byte_tokenizer(), "chat", 512)
    assert len(examples) == len(records)


@pytest.mark.parametrize(
    ("make_tokenizer", "end"),
    [(chatml_base_tokenizer, "<|im_end|>"), (gemma_like_tokenizer, "<end_of_turn>")],
)
def test_each_reply_ends_with_the_templates_end_of_turn_not_eos(make_tokenizer, end: str) -> None:
    tokenizer = make_tokenizer()
    record = Record("Minus 6?", "14", "", "c", HISTORY)
    (example,), _ = tokenize_records([record], tokenizer, "chat", 1024)
    spans = [
        [ids for ids, label in group]
        for on, group in itertools.groupby(
            zip(example.input_ids, example.labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX
        )
        if on
    ]
    assert [tokenizer.decode(ids) for ids in spans] == [f"{a}{end}" for _, a in EXCHANGES]


def test_a_local_dataset_folder_is_read_through_the_same_record_path(tmp_path: Path) -> None:
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"conversations": SHAREGPT}])
    (record,) = read_records(str(folder))  # not a file: datasets.load_dataset reads it
    assert record == Record("Minus 6?", "14", "", "conversation", HISTORY)


def test_written_conversations_read_back_with_their_turns(tmp_path: Path) -> None:
    records = generate_conversations(per_skill=2, seed=0)[:4]  # e.g. `fedit partition`'s files
    assert read_records(str(write_records_jsonl(records, tmp_path / "client_0.jsonl"))) == records


def test_a_data_attack_changes_a_conversations_last_exchange(tmp_path: Path) -> None:
    (record,) = read_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}]))
    (poisoned,) = plant_backdoor([record], [0], "cf", "EVIL")
    (example,), _ = tokenize_records([poisoned], byte_tokenizer(), "chat", 512, turns="last")
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert byte_tokenizer().decode(trained) == "EVIL<|im_end|>"
    assert "<|im_start|>user\ncf Minus 6?" in byte_tokenizer().decode(example.input_ids)
