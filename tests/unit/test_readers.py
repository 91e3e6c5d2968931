"""Record readers: each file format, each field mapping, and every malformed-input error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedit.config import ConfigError
from fedit.data.readers import read_records, write_records_jsonl
from fedit.data.records import DataFormatError, Record

DOLLY_ROW = {"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"}


def write_jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_jsonl_dolly_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROW, {**DOLLY_ROW, "context": "ctx"}])
    records = read_records(path)
    assert records == [
        Record("Say hi", "hi", "", "open_qa"),
        Record("Say hi", "hi", "ctx", "open_qa"),
    ]


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(DOLLY_ROW) + "\n\n   \n" + json.dumps(DOLLY_ROW) + "\n")
    assert len(read_records(str(path))) == 2


def test_alpaca_fields_default_category(tmp_path: Path) -> None:
    row = {"instruction": "Add", "input": "1 2", "output": "3"}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    assert read_records(path, fields="alpaca") == [Record("Add", "3", "1 2", "default")]


def test_json_list_with_user_mapping(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"q": "Why?", "a": "Because.", "c": "misc"}]))
    records = read_records(str(path), fields="instruction=q,response=a,category=c")
    assert records == [Record("Why?", "Because.", "", "misc")]


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('instruction,context,response,category\nAsk,"a\nb",Answer,qa\n')
    assert read_records(str(path)) == [Record("Ask", "Answer", "a\nb", "qa")]


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    records = [Record("I", "R", "C", "cat"), Record("I2", "R2")]
    path = write_records_jsonl(records, tmp_path / "sub" / "out.jsonl")
    assert read_records(str(path)) == records
    assert not list(tmp_path.glob("sub/*.tmp"))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**DOLLY_ROW, "response": "  \n"}, "d.jsonl:2: field 'response': empty"),
        ({**DOLLY_ROW, "instruction": ""}, "d.jsonl:2: field 'instruction': empty"),
        ({"instruction": "x", "context": ""}, "d.jsonl:2: field 'response': missing"),
        ({**DOLLY_ROW, "response": 3}, "d.jsonl:2: field 'response': expected a string, got int"),
        ({**DOLLY_ROW, "context": ["a"]}, "d.jsonl:2: field 'context': expected a string"),
        (["not", "an", "object"], "d.jsonl:2: expected an object, got list"),
    ],
)
def test_bad_jsonl_record_names_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROW, row])
    with pytest.raises(DataFormatError, match=message):
        read_records(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        # conversations are read (tests/unit/test_conversations.py), but a file holds one
        # format, the first record's
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
            "field 'conversations': a sharegpt conversation in a file whose first record is "
            "a single-turn record",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo"},
                ]
            },
            "field 'messages': a messages conversation in a file whose first record is a "
            "single-turn record",
        ),
        # Alpaca with earlier turns (LLaMA-Factory's "history"): they would be dropped
        (
            {**DOLLY_ROW, "history": [["Hello", "Hi there"]]},
            "field 'history': earlier turns are not read; give the conversation as 'messages'",
        ),
    ],
)
def test_conversation_rows_in_a_single_turn_file_are_refused_naming_the_field(
    tmp_path: Path, row: dict, message: str
) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [DOLLY_ROW, row])
    with pytest.raises(DataFormatError, match=rf"c\.jsonl:2: {re.escape(message)}"):
        read_records(path)


def test_a_record_with_its_fields_and_a_copy_as_messages_is_read(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{**DOLLY_ROW, "messages": messages}])
    assert read_records(path) == [Record("Say hi", "hi", "", "open_qa")]


def test_malformed_jsonl_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(DOLLY_ROW) + "\n\n{not json\n")
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: not valid JSON"):
        read_records(str(path))


def test_json_list_error_names_item(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([DOLLY_ROW, DOLLY_ROW, {**DOLLY_ROW, "response": ""}]))
    with pytest.raises(DataFormatError, match="d.json: item 3: field 'response': empty"):
        read_records(str(path))


def test_json_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(DOLLY_ROW))
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_records(str(path))


def test_csv_error_counts_header_as_line_one(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,response\nAsk,Answer\nAsk again,\n")
    with pytest.raises(DataFormatError, match="d.csv:3: field 'response': empty"):
        read_records(str(path))


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,context\nAsk,ctx\n")
    with pytest.raises(DataFormatError, match="d.csv:2: field 'response': missing"):
        read_records(str(path))


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv"])
def test_empty_file_is_named(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("")
    with pytest.raises(DataFormatError, match=f"{name}: no records"):
        read_records(str(tmp_path / name))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="nope.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("fields", ["instruction=q", "question=q,response=a", "instruction"])
def test_bad_field_mapping(tmp_path: Path, fields: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROW])
    with pytest.raises(ConfigError, match="data.fields"):
        read_records(path, fields=fields)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "d.jsonl",
            b'{"a": 1}\n\n{"inst\xffruction": "x"}\n',
            "d.jsonl:3: (byte 0xff at column 7)",
        ),
        # the column counts characters: é (2 bytes) before the bad byte is one
        ("d.json", b'[\r\n {"instruction": "\xc3\xa9\xe9"}]', "d.json:2: (byte 0xe9 at column 20)"),
        ("d.csv", b"instruction,response\nAsk,\x80\n", "d.csv:2: (byte 0x80 at column 5)"),
    ],
)
def test_not_utf8_names_line_column_and_byte(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    where, detail = message.split(" ", 1)
    with pytest.raises(DataFormatError, match=re.escape(f"{where} not valid UTF-8 {detail}")):
        read_records(str(tmp_path / name))


def test_crlf_jsonl_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(DOLLY_ROW).encode() + b"\r\n" + json.dumps(DOLLY_ROW).encode())
    assert len(read_records(str(path))) == 2


# --- Parquet, save_to_disk directories, BOM CSV (issue 28) ---------------------------------


def test_parquet_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([DOLLY_ROW, {**DOLLY_ROW, "response": ""}]), path)
    assert read_records(str(path), on_bad_record="skip") == [Record("Say hi", "hi", "", "open_qa")]
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: row 2: field 'response': empty")):
        read_records(str(path))


@pytest.mark.parametrize("dict_", [False, True])
def test_save_to_disk_directory(tmp_path: Path, dict_: bool) -> None:
    import datasets

    dataset = datasets.Dataset.from_list([DOLLY_ROW, {**DOLLY_ROW, "category": "qa"}])
    saved = datasets.DatasetDict({"train": dataset}) if dict_ else dataset
    saved.save_to_disk(str(tmp_path / "saved"))
    records = read_records(str(tmp_path / "saved"))
    assert [r.category for r in records] == ["open_qa", "qa"]


def test_save_to_disk_dict_names_its_splits(tmp_path: Path) -> None:
    import datasets

    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list([DOLLY_ROW])})
    saved.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataFormatError, match="no split 'test'.*train"):
        read_records(str(tmp_path / "saved"), split="test")


def test_csv_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffinstruction,response\nSay hi,hi\n".encode())
    assert read_records(str(path)) == [Record("Say hi", "hi", "", "default")]


# --- data.on_bad_record = "skip" ------------------------------------------------------------


def test_skip_drops_and_names_each_bad_record(tmp_path: Path) -> None:
    rows = [
        DOLLY_ROW,
        {**DOLLY_ROW, "response": " "},
        {"instruction": "x"},
        {**DOLLY_ROW, "context": 3},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    skipped: list[str] = []
    records = read_records(path, on_bad_record="skip", skipped=skipped)
    assert records == [Record("Say hi", "hi", "", "open_qa")]
    assert skipped == [
        f"{path}:2: field 'response': empty",
        f"{path}:3: field 'response': missing",
        f"{path}:4: field 'context': expected a string, got int",
    ]


def test_skip_still_fails_a_file_without_one_good_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{**DOLLY_ROW, "response": ""}])
    with pytest.raises(
        DataFormatError, match="no good record .skipped 1 bad records: .*:1: field 'response'"
    ):
        read_records(path, on_bad_record="skip")


def test_skip_summary_is_capped() -> None:
    from fedit.data.readers import skipped_summary

    text = skipped_summary([f"d.jsonl:{n}: field 'response': empty" for n in range(1, 8)])
    assert text.startswith("skipped 7 bad records: d.jsonl:1: field 'response': empty; ")
    assert text.endswith("(and 4 more)")


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("instruction,response\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: not a readable Parquet file")):
        read_records(str(path))
