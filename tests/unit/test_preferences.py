"""Preference pairs: reading the three formats, rejecting malformed pairs, tokenising, collating."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedit.data.preferences import (
    PairTruncationReport,
    PreferencePair,
    TokenizedPair,
    collate_pairs,
    detect_format,
    read_preferences,
    tokenize_pairs,
)
from fedit.data.records import DataFormatError, Record
from fedit.data.templates import render_prompt
from fedit.models.tiny import byte_tokenizer
from tests.conftest import chatml_base_tokenizer, sentencepiece_tokenizer

HH_PROMPT = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"
HH_RECORD = {"chosen": HH_PROMPT + " An apple.", "rejected": HH_PROMPT + " A brick."}
UF_RECORD = {
    "prompt": "What is 2+2?",
    "chosen": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4 "},
    ],
    "rejected": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "5"},
    ],
    "score_chosen": 9.0,
}
PLAIN_RECORD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "category": "greeting"}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- reading


def test_hh_multi_turn_prompt_is_shared_prefix_through_last_assistant(tmp_path: Path) -> None:
    [pair] = read_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH_RECORD]), format="hh")
    turns = (("user", "Hi there."), ("assistant", "Hello!"), ("user", "Name a fruit."))
    assert pair == PreferencePair(HH_PROMPT, "An apple.", "A brick.", "default", turns)


def test_hh_responses_sharing_their_first_words_are_split_at_the_assistant_turn(
    tmp_path: Path,
) -> None:
    record = {
        "chosen": "\n\nHuman: Colour of sky?\n\nAssistant: It is blue.",
        "rejected": "\n\nHuman: Colour of sky?\n\nAssistant: It is green.",
    }
    [pair] = read_preferences(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert pair.prompt == "\n\nHuman: Colour of sky?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == ("It is blue.", "It is green.")


def test_hh_dialogues_diverging_in_a_later_human_turn_keep_it_in_the_responses(
    tmp_path: Path,
) -> None:
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Thanks\n\nAssistant: Welcome",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye\n\nAssistant: Later",
    }
    [pair] = read_preferences(write_jsonl(tmp_path / "hh.jsonl", [record]), format="hh")
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant:"
    assert pair.chosen == "Hey\n\nHuman: Thanks\n\nAssistant: Welcome"


def test_ultrafeedback_takes_prompt_field_and_final_assistant_message(tmp_path: Path) -> None:
    path = tmp_path / "uf.json"
    path.write_text(json.dumps([UF_RECORD]), encoding="utf-8")
    [pair] = read_preferences(str(path), format="ultrafeedback")
    assert pair == PreferencePair("What is 2+2?", "4", "5", "default")


def test_plain_format_from_json_jsonl_and_csv(tmp_path: Path) -> None:
    expected = [PreferencePair("Say hi.", "Hi!", "No.", "greeting")]
    json_path = tmp_path / "p.json"
    json_path.write_text(json.dumps([PLAIN_RECORD]), encoding="utf-8")
    csv_path = tmp_path / "p.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(PLAIN_RECORD))
        writer.writeheader()
        writer.writerow(PLAIN_RECORD)
    assert read_preferences(str(json_path), format="plain") == expected
    assert read_preferences(write_jsonl(tmp_path / "p.jsonl", [PLAIN_RECORD])) == expected
    assert read_preferences(str(csv_path)) == expected


def test_auto_detects_each_record_format(tmp_path: Path) -> None:
    assert [detect_format(r) for r in (PLAIN_RECORD, HH_RECORD, UF_RECORD)] == [
        "plain",
        "hh",
        "ultrafeedback",
    ]
    pairs = read_preferences(
        write_jsonl(tmp_path / "mixed.jsonl", [PLAIN_RECORD, HH_RECORD, UF_RECORD])
    )
    assert [pair.prompt for pair in pairs] == ["Say hi.", HH_PROMPT, "What is 2+2?"]


def test_unknown_format_and_missing_file_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preference format"):
        read_preferences(str(tmp_path / "x.jsonl"), format="sharegpt")
    with pytest.raises(DataFormatError, match=r"missing\.jsonl: file not found"):
        read_preferences(str(tmp_path / "missing.jsonl"))
    (tmp_path / "prefs.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        read_preferences(str(tmp_path / "prefs.txt"))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no preference pairs"):
        read_preferences(str(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------------------- malformed pairs

MALFORMED = [
    # (format, record, field, problem)
    ("plain", {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ("plain", {"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ("plain", {"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "empty response"),
    ("plain", {"prompt": "p", "chosen": "same", "rejected": "same "}, "rejected", "identical"),
    ("plain", {"prompt": "p", "chosen": "a", "rejected": "b", "category": 1}, "category", "string"),
    (
        "hh",
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "Hi\n\nAssistant: y"},
        "chosen",
        "shared",
    ),
    ("hh", {"chosen": "no dialogue here", "rejected": "none here"}, "chosen", "shared"),
    (
        "hh",
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: "},
        "rejected",
        "empty",
    ),
    (
        "ultrafeedback",
        {**UF_RECORD, "rejected": [{"role": "user", "content": "q"}]},
        "rejected",
        "assistant",
    ),
    ("ultrafeedback", {**UF_RECORD, "chosen": []}, "chosen", "assistant"),
    ("ultrafeedback", {**UF_RECORD, "chosen": "4"}, "chosen", "message list"),
    ("ultrafeedback", {**UF_RECORD, "prompt": None}, "prompt", "missing"),
    ("auto", {"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ("auto", ["not", "an", "object"], "(record)", "expected an object"),
]


@pytest.mark.parametrize(("format", "record", "field", "problem"), MALFORMED)
def test_malformed_jsonl_record_names_file_line_and_field(
    tmp_path: Path, format: str, record: object, field: str, problem: str
) -> None:
    valid = {
        "plain": PLAIN_RECORD,
        "hh": HH_RECORD,
        "ultrafeedback": UF_RECORD,
        "auto": PLAIN_RECORD,
    }
    path = write_jsonl(tmp_path / "bad.jsonl", [valid[format], record])
    with pytest.raises(DataFormatError) as raised:
        read_preferences(path, format=format)
    message = str(raised.value)
    assert message.startswith(f"{path}:2: field '{field}': ")  # fedit.data.readers' format
    assert problem in message


MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
CONVERSATIONS = [
    # chosen and rejected answer different conversations: which question is unclear
    ({**UF_RECORD, "chosen": MULTI_TURN}, "rejected", "differ from chosen's"),
    (
        {**UF_RECORD, "rejected": [*MULTI_TURN[:3], {"role": "assistant", "content": "7"}]},
        "rejected",
        "differ from chosen's",
    ),
    # the user turn is not the prompt: which question the answer belongs to is unclear
    (
        {
            **UF_RECORD,
            "chosen": [{"role": "user", "content": "Other?"}, UF_RECORD["chosen"][1]],
            "rejected": [{"role": "user", "content": "Other?"}, UF_RECORD["rejected"][1]],
        },
        "chosen",
        "differs from field 'prompt'",
    ),
    # an SFT conversation record is no preference pair: the error names the formats there are
    ({"messages": MULTI_TURN, "chosen": "6", "rejected": "7"}, "prompt", "known: plain, hh"),
]


@pytest.mark.parametrize(("record", "field", "problem"), CONVERSATIONS)
def test_unsupported_conversation_pairs_are_refused_naming_file_line_and_field(
    tmp_path: Path, record: dict, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "conv.jsonl", [UF_RECORD, record])
    with pytest.raises(DataFormatError) as raised:
        read_preferences(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:2: field '{field}': ")
    assert problem in message and "\n" not in message


def test_multi_turn_message_lists_are_read_as_a_conversation(tmp_path: Path) -> None:
    """Issue 26 refused these (they were read as the first question and the last answer);
    now the earlier turns are the prompt conversation."""
    system = {"role": "system", "content": "Be terse."}
    rejected = [*MULTI_TURN[:3], {"role": "assistant", "content": "7"}]
    record = {**UF_RECORD, "chosen": [system, *MULTI_TURN], "rejected": [system, *rejected]}
    [pair] = read_preferences(write_jsonl(tmp_path / "uf.jsonl", [record]))
    turns = tuple((m["role"], m["content"]) for m in [system, *MULTI_TURN[:3]])
    assert pair == PreferencePair("", "6", "7", "default", turns)


def test_single_turn_message_lists_are_still_read(tmp_path: Path) -> None:
    answer_only = {**UF_RECORD, "chosen": [{"role": "assistant", "content": "4"}]}
    # UltraFeedback-binarized also has the chosen dialogue as "messages"
    with_messages = {**UF_RECORD, "messages": UF_RECORD["chosen"]}
    rows = [UF_RECORD, answer_only, with_messages]
    pairs = read_preferences(write_jsonl(tmp_path / "uf.jsonl", rows))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("What is 2+2?", "4", "5")] * 3


def test_malformed_json_item_and_csv_line_are_located(tmp_path: Path) -> None:
    json_path = tmp_path / "bad.json"
    json_path.write_text(json.dumps([PLAIN_RECORD, PLAIN_RECORD, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(DataFormatError, match=r"bad\.json: item 3: field 'rejected': missing"):
        read_preferences(str(json_path))
    csv_path = tmp_path / "bad.csv"
    # The first row's prompt spans two physical lines, so the bad row starts on line 4.
    csv_path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\np,a,\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv:4: field 'rejected': empty response"):
        read_preferences(str(csv_path))
    short_path = tmp_path / "short.csv"  # a row with fewer cells than the header
    short_path.write_text("prompt,chosen,rejected\np,a\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"short\.csv:2: field 'rejected': missing"):
        read_preferences(str(short_path))


def test_invalid_json_line_is_located(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PLAIN_RECORD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl:2: not valid JSON"):
        read_preferences(str(path))


# ---------------------------------------------------------------------------- tokenising


def ids(text: str) -> list[int]:
    """Token ids of text under the byte tokenizer (one id per byte), without specials."""
    return byte_tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_tokenize_pairs_appends_eos_and_renders_prompt() -> None:
    tokenizer = byte_tokenizer()
    pair = PreferencePair("Hi", "ok", "no!", "c")
    [item], report = tokenize_pairs(
        [pair], tokenizer, 16, 64, render_prompt=lambda p: f"Q:{p.prompt}>"
    )
    eos = tokenizer.eos_token_id
    assert item == TokenizedPair(ids("Q:Hi>"), [*ids("ok"), eos], [*ids("no!"), eos], "c")
    assert report == PairTruncationReport(1, 0, 0, 0)


def test_tokenize_pairs_keeps_prompt_end_and_cuts_responses_to_total_budget() -> None:
    tokenizer = byte_tokenizer()
    pairs = [
        # prompt 10 tokens → its last 4; budget 12 - 4 = 8
        PreferencePair("abcdefghij", "0123456789", "xy", "long"),
        PreferencePair("ab", "c", "d"),  # fits: 2 + 2 ≤ 12
    ]
    items, report = tokenize_pairs(pairs, tokenizer, max_prompt_len=4, max_total_len=12)
    assert items[0].prompt_ids == ids("ghij")  # the end of the prompt is kept
    assert items[0].chosen_ids == ids("01234567")  # 11 tokens with eos, cut to 8: eos lost
    assert items[0].rejected_ids == [*ids("xy"), tokenizer.eos_token_id]
    assert all(len(i.prompt_ids) + len(i.chosen_ids) <= 12 for i in items)
    assert report == PairTruncationReport(2, 1, 1, 0)


def test_tokenize_pairs_drops_pairs_left_without_response_tokens() -> None:
    pairs = [PreferencePair("abcdef", "yes", "no"), PreferencePair("a", "yes", "no")]
    # pair 1: the 6-token prompt fills max_total_len = 4 on its own → dropped;
    # pair 2: budget 4 - 1 = 3, so "yes" + eos (4 tokens) is cut to "yes"
    items, report = tokenize_pairs(pairs, byte_tokenizer(), max_prompt_len=6, max_total_len=4)
    assert [(i.prompt_ids, i.chosen_ids) for i in items] == [(ids("a"), ids("yes"))]
    assert report == PairTruncationReport(2, 0, 1, 1)


def test_tokenize_pairs_handles_empty_input_and_rejects_bad_limits() -> None:
    assert tokenize_pairs([], byte_tokenizer(), 4, 8)[0] == []
    with pytest.raises(ValueError, match="max_total_len"):
        tokenize_pairs([], byte_tokenizer(), 4, 0)


# ---------------------------------------------------------------------------- collating


def test_collate_pairs_puts_chosen_rows_first_and_masks_prompt_and_padding() -> None:
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6]), TokenizedPair([7], [8], [9, 10])]
    batch = collate_pairs(pairs, pad_id=0)
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        "input_ids": (4, 5),
        "attention_mask": (4, 5),
        "labels": (4, 5),
    }  # rows: chosen 1, chosen 2, rejected 1, rejected 2; T = 2 + 3
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 0, 0, 0],
        [1, 2, 6, 0, 0],
        [7, 9, 10, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1] * 5,
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 3, 4, 5],
        [-100, 8, -100, -100, -100],
        [-100, -100, 6, -100, -100],
        [-100, 9, 10, -100, -100],
    ]


def test_collate_pairs_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="at least one pair"):
        collate_pairs([], pad_id=0)


@pytest.mark.parametrize(
    ("make", "template", "end_token"),
    [(chatml_base_tokenizer, "chat", "<|im_end|>"), (sentencepiece_tokenizer, "alpaca", "</s>")],
)
def test_tokenize_pairs_ends_responses_as_the_template_ends_a_turn(
    make, template: str, end_token: str
) -> None:
    """Chat responses end with the template's end of turn (<|im_end|>, not eos), and each
    prompt + response is the tokenisation of the whole text (no ▁ before the response)."""
    from fedit.config import load_config
    from fedit.engine.federation_data import tokenize_pairs_for

    tokenizer = make()
    end = tokenizer.convert_tokens_to_ids(end_token)
    pair = PreferencePair("Name a color.", "Red is a color.", "Blue, too.")
    cfg = load_config(None, ["data.path=x.jsonl", f"data.template={template}"])
    [item], _ = tokenize_pairs_for(cfg, tokenizer, [pair])
    prompt = render_prompt(Record(pair.prompt, ""), template, tokenizer)
    for response, response_ids in (
        (pair.chosen, item.chosen_ids),
        (pair.rejected, item.rejected_ids),
    ):
        assert response_ids[-1] == end
        whole = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        assert item.prompt_ids + response_ids[:-1] == whole
