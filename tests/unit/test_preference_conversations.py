"""Conversational preference pairs (TRL's format, HH dialogues) under the chat template, and
the field map of plain pairs: what is read, which tokens carry loss, and each refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedit.config import ConfigError, RunConfig
from fedit.config.data import parse_preference_fields
from fedit.config.toml_read import build_config
from fedit.data.preferences import (
    IGNORE_INDEX,
    PreferencePair,
    collate_pairs,
    detect_format,
    read_preferences,
)
from fedit.data.records import DataFormatError, Record
from fedit.data.templates import render_prompt
from fedit.engine.federation_data import tokenize_pairs_for
from fedit.models.tiny import byte_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
PROMPT = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
CHOSEN = [{"role": "assistant", "content": "6"}]
REJECTED = [{"role": "assistant", "content": "It is 7."}]
EXPLICIT = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "category": "math"}
IMPLICIT = {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED, "category": "math"}
HH = {
    "chosen": "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: "
    "An apple.",
    "rejected": "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"
    " A brick.",
}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def config(*overrides: str) -> RunConfig:
    base = ["data.preference_path=synthetic", "train.objective=dpo", "data.max_seq_len=512"]
    return build_config({}, [*base, "dpo.max_prompt_len=400", *overrides]).validate()


def test_explicit_multi_turn_pair_is_a_prompt_conversation_and_two_replies(tmp_path: Path) -> None:
    [pair] = read_preferences(write_jsonl(tmp_path / "p.jsonl", [EXPLICIT]))
    turns = tuple((m["role"], m["content"]) for m in PROMPT)
    assert pair == PreferencePair("", "6", "It is 7.", "math", turns)
    assert pair.messages() == PROMPT


def test_prompt_tokens_carry_no_loss_and_response_tokens_do_token_by_token(
    tmp_path: Path,
) -> None:
    tokenizer = byte_tokenizer()  # ChatML template; a turn ends with <|im_end|>
    pairs = read_preferences(write_jsonl(tmp_path / "p.jsonl", [EXPLICIT]))
    [item], report = tokenize_pairs_for(config("data.template=chat"), tokenizer, pairs)
    assert report.dropped == report.prompt_truncated == report.response_truncated == 0
    prompt_text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompt_text  # every turn in its role
    assert "<|im_start|>assistant\n4<|im_end|>" in prompt_text
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    responses = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in ("6", "It is 7.")
    ]
    batch = collate_pairs([item], tokenizer.pad_token_id)
    for row, response in enumerate(responses):  # row 0 chosen, row 1 rejected
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids[: len(prompt_ids)] == prompt_ids
        for position in range(len(ids)):
            response_at = position - len(prompt_ids)
            if 0 <= response_at < len(response):
                assert labels[position] == ids[position] == response[response_at], position
            else:  # prompt (system, user and earlier assistant turns) and padding
                assert labels[position] == IGNORE_INDEX, position
    assert tokenizer.decode(responses[1]) == "It is 7.<|im_end|>"


def test_implicit_prompt_form_gives_the_same_rows_as_the_explicit_one(tmp_path: Path) -> None:
    tokenizer, cfg = byte_tokenizer(), config("data.template=chat")
    explicit = read_preferences(write_jsonl(tmp_path / "e.jsonl", [EXPLICIT]))
    implicit = read_preferences(write_jsonl(tmp_path / "i.jsonl", [IMPLICIT]))
    assert implicit == explicit
    assert tokenize_pairs_for(cfg, tokenizer, implicit) == tokenize_pairs_for(
        cfg, tokenizer, explicit
    )


def test_data_system_prompt_fills_in_only_where_the_conversation_has_none(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    no_system = {**EXPLICIT, "prompt": PROMPT[1:]}
    pairs = read_preferences(write_jsonl(tmp_path / "p.jsonl", [EXPLICIT, no_system]))
    cfg = config("data.template=chat", 'data.system_prompt="Be kind."')
    own, filled = tokenize_pairs_for(cfg, tokenizer, pairs)[0]
    assert "You are terse." in tokenizer.decode(own.prompt_ids)
    assert "Be kind." not in tokenizer.decode(own.prompt_ids)
    assert tokenizer.decode(filled.prompt_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>")


def test_hh_dialogue_is_rendered_in_the_chat_templates_roles(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    [pair] = read_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH]))
    [item], _ = tokenize_pairs_for(config("data.template=chat"), tokenizer, [pair])
    turns = [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."},
    ]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(item.prompt_ids) == rendered
    assert "Human:" not in rendered


def test_hh_dialogue_under_alpaca_keeps_its_text_as_one_instruction(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    [pair] = read_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH]))
    [item], _ = tokenize_pairs_for(config("data.template=alpaca"), tokenizer, [pair])
    expected = render_prompt(Record(pair.prompt, ""), "alpaca", tokenizer)
    assert "\n\nHuman: Hi there.\n\nAssistant: Hello!" in expected
    assert tokenizer.decode(item.prompt_ids) == expected


def test_alpaca_refuses_a_multi_turn_pair_in_one_line(tmp_path: Path) -> None:
    pairs = read_preferences(write_jsonl(tmp_path / "p.jsonl", [EXPLICIT]))
    with pytest.raises(DataFormatError) as raised:
        tokenize_pairs_for(config("data.template=alpaca"), byte_tokenizer(), pairs)
    message = str(raised.value)
    assert "data.template = 'chat'" in message and "\n" not in message


def test_a_single_user_turn_conversation_stays_a_one_text_prompt(tmp_path: Path) -> None:
    """It renders under alpaca as a plain pair with that prompt would."""
    record = {**EXPLICIT, "prompt": [{"role": "user", "content": "Hi?"}]}
    [pair] = read_preferences(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert pair == PreferencePair("Hi?", "6", "It is 7.", "math")


def test_auto_detects_each_format() -> None:
    assert detect_format(EXPLICIT) == detect_format(IMPLICIT) == "conversational"
    assert detect_format(HH) == "hh"
    assert detect_format({"prompt": "q", "chosen": CHOSEN}) == "ultrafeedback"
    assert detect_format({"prompt": "q", "chosen": "a"}) == "plain"
    assert detect_format({"question": "q", "good": "a"}) == ""


def test_an_unknown_shape_names_the_formats_there_are(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [EXPLICIT, {"question": "q", "good": "a"}])
    with pytest.raises(DataFormatError) as raised:
        read_preferences(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:2: field 'prompt': ")
    assert "plain, hh, ultrafeedback, conversational" in message and "\n" not in message


MALFORMED = [
    # (record, field, problem)
    ({**EXPLICIT, "prompt": PROMPT[:3]}, "prompt", "must end with a user turn"),
    ({**EXPLICIT, "prompt": [PROMPT[1], SYSTEM, PROMPT[3]]}, "prompt", "system turn"),
    ({**EXPLICIT, "chosen": CHOSEN + CHOSEN}, "chosen", "one assistant message"),
    ({**EXPLICIT, "rejected": [{"role": "user", "content": "x"}]}, "rejected", "one assistant"),
    ({**EXPLICIT, "prompt": [{"role": "human", "content": "x"}]}, "prompt", "message 1"),
    ({**EXPLICIT, "chosen": [{"role": "assistant", "content": 6}]}, "chosen", "message 1"),
    ({**EXPLICIT, "chosen": "6"}, "chosen", "expected a message list"),
    ({**IMPLICIT, "rejected": PROMPT[:2] + REJECTED}, "rejected", "differ from chosen's"),
    ({"chosen": CHOSEN, "rejected": REJECTED}, "chosen", "shares no prompt turn"),
    ({**IMPLICIT, "chosen": PROMPT}, "chosen", "no final assistant turn"),
    ({**EXPLICIT, "rejected": CHOSEN}, "rejected", "identical to chosen"),
]


@pytest.mark.parametrize(("record", "field", "problem"), MALFORMED)
def test_malformed_conversational_pair_is_one_line_naming_file_line_and_field(
    tmp_path: Path, record: dict, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [EXPLICIT, record])
    with pytest.raises(DataFormatError) as raised:
        read_preferences(path, format="conversational")
    message = str(raised.value)
    assert message.startswith(f"{path}:2: field '{field}': "), message
    assert problem in message and "\n" not in message


# ---------------------------------------------------------------------------- field map


def test_field_map_reads_plain_pairs_under_other_keys(tmp_path: Path) -> None:
    rows = [{"question": "Say hi.", "good": "Hi!", "bad": "No.", "topic": "greeting"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    fields = "prompt=question,chosen=good,rejected=bad,category=topic"
    [pair] = read_preferences(path, "plain", fields=fields)
    assert pair == PreferencePair("Say hi.", "Hi!", "No.", "greeting")
    rows.append({"question": "q", "good": "a"})
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: field 'rejected': missing"):
        read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), "plain", fields=fields)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ("prompt=q,chosen=a", "does not map rejected"),
        ("prompt=q,chosen=a,rejected=b,answer=c", "bad entry 'answer=c'"),
        ("prompt=q,chosen=a,rejected", "bad entry 'rejected'"),
        ("prompt=q,prompt=r,chosen=a,rejected=b", "bad entry 'prompt=r'"),
    ],
)
def test_bad_field_maps_are_refused_by_the_config(fields: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"data.preference_fields: .*{problem}"):
        config(f'data.preference_fields="{fields}"')
    assert parse_preference_fields("") == {}
