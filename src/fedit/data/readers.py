"""Read instruction records from JSON, JSONL, CSV, Parquet files, a ``Dataset.save_to_disk``
directory or a Hugging Face dataset.

``read_records("data/dolly.jsonl")`` returns validated ``Record`` objects; any malformed
record raises ``DataFormatError`` naming the file, the line (or item) and the field, e.g.
``data/x.jsonl:17: field 'response': empty``; with ``on_bad_record="skip"`` such records
are dropped and named instead (``skipped_summary``). ``write_records_jsonl`` writes records back
in Dolly's fields (conversations as OpenAI ``messages``), which ``read_records`` reads
again unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fedit.config import ConfigError
from fedit.data.conversations import FORMATS, conversation_format, conversation_record
from fedit.data.records import DataFormatError, Record
from fedit.textfile import NotUTF8Error, read_utf8

# Record field -> source key, for the two layouts we know by name.
FIELD_MAPS: dict[str, dict[str, str]] = {
    "dolly": {
        "instruction": "instruction",
        "context": "context",
        "response": "response",
        "category": "category",
    },
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output"},
}
# What a file's first record may be, named when it is none of them.
KNOWN_FORMATS = (
    "dolly (instruction, response[, context, category]), alpaca (instruction, output[, input]), "
    "a field map (data.fields), messages (OpenAI roles), sharegpt (conversations: from, value)"
)
REQUIRED = ("instruction", "response")
OPTIONAL = ("context", "category")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
SKIPPED_SHOWN = 3  # skipped records named in a summary line; the rest are counted
# Keys under which conversation layouts keep a whole dialogue (OpenAI's, ShareGPT's), and
# the key of Alpaca's earlier turns (LLaMA-Factory's "history"). SFT files in those two
# layouts are read as conversations (fedit.data.conversations); preference pairs and
# Alpaca's "history" are refused rather than read without their turns.
CONVERSATION_KEYS = ("messages", "conversations")
EARLIER_TURNS_KEY = "history"
CONVERSATIONS_UNSUPPORTED = (
    "conversation records (OpenAI 'messages', ShareGPT 'conversations', earlier turns) are "
    "not supported yet; give one prompt and one response per record"
)


def parse_fields(fields: str) -> dict[str, str]:
    """Resolve 'dolly', 'alpaca' or 'instruction=q,context=ctx,response=a,category=c'."""
    if fields in FIELD_MAPS:
        return FIELD_MAPS[fields]
    mapping: dict[str, str] = {}
    for part in fields.split(","):
        target, sep, source = (s.strip() for s in part.partition("="))
        if not sep or not source or target not in REQUIRED + OPTIONAL:
            raise ConfigError(
                f"data.fields: bad entry {part.strip()!r} in {fields!r}; expected 'dolly', "
                "'alpaca' or 'instruction=KEY,response=KEY[,context=KEY][,category=KEY]'"
            )
        mapping[target] = source
    missing = [name for name in REQUIRED if name not in mapping]
    if missing:
        raise ConfigError(f"data.fields: {fields!r} does not map {', '.join(missing)}")
    return mapping


def read_records(
    source: str,
    fields: str = "dolly",
    split: str = "train",
    on_bad_record: str = "error",
    skipped: list[str] | None = None,
) -> list[Record]:
    """Read and validate every record of a file (.json/.jsonl/.csv/.parquet), a
    ``save_to_disk`` directory or a HF dataset name.

    ``on_bad_record="skip"`` drops each malformed record instead of raising, appending its
    error line to `skipped` (when given) so the caller can report it; a source without one
    good record still fails. The text readers are hand-written rather than
    ``datasets.load_dataset``'s because an error must name the file, line and field, which
    the ``datasets`` loaders do not.
    """
    mapping = parse_fields(fields)
    bad: list[str] = []
    records: list[Record] = []
    read = None
    for where, row in iter_rows(source, split):
        try:
            read = read or record_reader(row, mapping, where)  # the file's format: its first row's
            records.append(read(row, where))
        except DataFormatError as err:
            if on_bad_record != "skip":
                raise
            bad.append(str(err))
    if not records and bad:
        raise DataFormatError(f"{source}: no good record ({skipped_summary(bad)})")
    if not records:
        raise DataFormatError(f"{source}: no records")
    if skipped is not None:
        skipped += bad
    return records


def skipped_summary(skipped: list[str]) -> str:
    """One line naming the first skipped records and counting the rest."""
    shown = "; ".join(skipped[:SKIPPED_SHOWN])
    more = len(skipped) - SKIPPED_SHOWN
    return f"skipped {len(skipped)} bad records: {shown}" + (
        f" (and {more} more)" if more > 0 else ""
    )


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, raw row) for every row of a .json/.jsonl/.csv/.parquet file, a
    ``save_to_disk`` directory or a HF dataset split.

    ``where`` locates the row for error messages: ``path:LINE`` (JSONL, CSV), ``path: item N``
    (JSON lists, 1-based), ``path: row N`` (Parquet) or ``name[split] row N``. A missing or
    unsupported file fails here, before any row is read; malformed JSON fails when its line
    is reached.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if is_saved_dataset(path):
        return _saved_rows(path, split)
    if suffix in FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise DataFormatError(f"{source}: file not found")
        if suffix not in FILE_SUFFIXES:
            raise DataFormatError(
                f"{source}: unsupported file type (use .json, .jsonl, .csv or .parquet)"
            )
        readers = {".json": _json_rows, ".jsonl": jsonl_rows, ".csv": _csv_rows}
        return readers.get(suffix, _parquet_rows)(path)
    return _hf_rows(source, split)


def record_reader(first: Any, mapping: dict[str, str], where: str) -> Callable[[Any, str], Record]:
    """How to read every row of a file whose first row is `first`: as the single-turn
    fields `mapping` names when it has them, else as the conversation layout it holds.
    A first row of neither is refused, naming the formats that exist."""
    fmt = conversation_format(first)
    has_fields = isinstance(first, dict) and all(
        first.get(mapping[name]) is not None for name in REQUIRED
    )
    if fmt and not has_fields:
        return lambda row, at: conversation_record(row, fmt, at)
    if isinstance(first, dict) and not has_fields and EARLIER_TURNS_KEY not in first:
        missing = next(mapping[name] for name in REQUIRED if first.get(mapping[name]) is None)
        raise DataFormatError(
            f"{where}: field {missing!r}: missing, and no known record format fits the keys "
            f"{', '.join(map(repr, first)) or '(none)'}; formats: {KNOWN_FORMATS}"
        )
    return lambda row, at: to_record(row, mapping, at)


def to_record(row: Any, mapping: dict[str, str], where: str) -> Record:
    """Validate one raw row (a dict) and map it onto a Record; `where` prefixes errors."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
    if EARLIER_TURNS_KEY not in mapping.values() and _nonempty_list(row.get(EARLIER_TURNS_KEY)):
        raise DataFormatError(  # read, the record would lose its turns
            f"{where}: field {EARLIER_TURNS_KEY!r}: earlier turns are not read; give the "
            "conversation as 'messages' (OpenAI roles) instead"
        )
    values: dict[str, str] = {}
    for name, key in mapping.items():
        value = row.get(key)
        if value is None:  # absent key, JSON null, or a short CSV row
            if name in REQUIRED:
                _refuse_mixed(row, where)  # the likelier reason it is missing
                raise DataFormatError(f"{where}: field {key!r}: missing")
            continue
        if not isinstance(value, str):
            raise DataFormatError(
                f"{where}: field {key!r}: expected a string, got {type(value).__name__}"
            )
        if name in REQUIRED and not value.strip():
            raise DataFormatError(f"{where}: field {key!r}: empty")
        values[name] = value
    if not values.get("category", "").strip():
        values["category"] = "default"
    return Record(**values)


def refuse_conversation(row: dict, where: str, keys: tuple[str, ...] = CONVERSATION_KEYS) -> None:
    """Raise DataFormatError naming the field when `row` holds dialogue turns under one of
    `keys`: fedit cannot read it as one prompt and one response without dropping turns
    (and training an answer against the wrong question)."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, list) and value:
            raise DataFormatError(f"{where}: field {key!r}: {CONVERSATIONS_UNSUPPORTED}")


def _nonempty_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value)


def _refuse_mixed(row: dict, where: str) -> None:
    """A conversation in a file read as single-turn records (its first record is one):
    say so, rather than that a single-turn field is missing."""
    fmt = conversation_format(row)
    if fmt:
        raise DataFormatError(
            f"{where}: field {FORMATS[fmt][0]!r}: a {fmt} conversation in a file whose first "
            "record is a single-turn record; one file holds one format"
        )


def _read_text(path: Path) -> str:
    try:
        # A byte-order mark (Excel's "CSV UTF-8") would otherwise stick to the first key.
        return read_utf8(path).removeprefix("\ufeff")
    except NotUTF8Error as err:
        raise DataFormatError(str(err)) from None


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """("<path>:<line>", the parsed line) of each non-blank line of a JSONL file."""
    # newline=None: the universal-newline line splitting of a text-mode file
    for number, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{number}: not valid JSON: {err.msg}") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.strip():
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(items, list):
        raise DataFormatError(f"{path}: expected a JSON list of objects")
    for number, item in enumerate(items, start=1):
        yield f"{path}: item {number}", item


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # newline="": csv does its own newline handling (quoted fields may hold line breaks)
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    start = 2  # the header is line 1
    for row in reader:
        yield f"{path}:{start}", row
        # A quoted field may span lines; the next row starts after this one ends.
        start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """("<path>: row N", the row as a dict) of each row of a Parquet file (1-based)."""
    import pyarrow as pa  # only this path needs it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # not Parquet, or cut short: bad input
        raise DataFormatError(f"{path}: not a readable Parquet file: {err}") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}: row {number}", row


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
    wrote (its marker files; ``datasets.load_dataset`` refuses such a directory)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _saved_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a ``save_to_disk`` directory; of a saved DatasetDict, the rows of `split`."""
    import datasets  # slow to import; only this path needs it

    dataset = datasets.load_from_disk(str(path))
    name = str(path)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataFormatError(
                f"{path}: no split {split!r} (data.split; it has {', '.join(dataset)})"
            )
        dataset, name = dataset[split], f"{path}[{split}]"
    for number, row in enumerate(dataset, start=1):
        yield f"{name} row {number}", row


def _hf_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets  # slow to import; only this path needs it

    for number, row in enumerate(datasets.load_dataset(name, split=split), start=1):
        yield f"{name}[{split}] row {number}", row


def write_records_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as Dolly-field JSONL, atomically (tmp file then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            row = {
                "instruction": r.instruction,
                "context": r.context,
                "response": r.response,
                "category": r.category,
            }
            if r.history:  # a conversation keeps its turns, as OpenAI messages
                turns = [*r.history, ("user", r.instruction), ("assistant", r.response)]
                messages = [{"role": role, "content": text} for role, text in turns]
                row = {"messages": messages, "category": r.category}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
