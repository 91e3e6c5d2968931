"""[data] and [partition]: where the records come from and how they are split over clients."""

from __future__ import annotations

import glob
from dataclasses import dataclass

from fedit.config.fields import ConfigError, require

TURNS = ("all", "last")  # which assistant turns of a conversation carry loss
# see fedit.data.preferences
PREFERENCE_FORMATS = ("auto", "plain", "hh", "ultrafeedback", "conversational")
ON_BAD_RECORD = ("error", "skip")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "category")  # category optional


def parse_preference_fields(fields: str) -> dict[str, str]:
    """{fedit's name: the file's key} from 'prompt=q,chosen=good,rejected=bad[,category=c]'
    ("" maps nothing: the file uses fedit's names)."""
    mapping: dict[str, str] = {}
    for part in fields.split(",") if fields.strip() else []:
        target, sep, source = (s.strip() for s in part.partition("="))
        if not sep or not source or target not in PREFERENCE_FIELDS or target in mapping:
            raise ConfigError(
                f"data.preference_fields: bad entry {part.strip()!r} in {fields!r}; expected "
                "'prompt=KEY,chosen=KEY,rejected=KEY[,category=KEY]'"
            )
        mapping[target] = source
    missing = [name for name in PREFERENCE_FIELDS[:3] if mapping and name not in mapping]
    if missing:
        raise ConfigError(f"data.preference_fields: {fields!r} does not map {', '.join(missing)}")
    return mapping


@dataclass
class DataConfig:
    """Where the instruction records come from and how they become token sequences."""

    # JSON/JSONL/CSV file, or a Hugging Face dataset name; built-in: "synthetic" (single-turn
    # skills), "synthetic_chat" (conversations of two skills each, data.template = "chat")
    path: str = ""
    split: str = "train"  # for Hugging Face datasets
    fields: str = (
        "dolly"  # dolly | alpaca | a mapping "instruction=q,context=ctx,response=a,category=c"
    )
    template: str = "alpaca"  # alpaca | chat (the tokenizer's own chat template)
    # chat: a system turn put first; unset: the chat template's own default (SmolLM2 writes
    # "You are a helpful AI assistant named SmolLM, ..."); "" an empty one (fewer tokens)
    system_prompt: str | None = None
    # tokens per record (prompt + response); longer records are truncated and counted; a record
    # whose response would be cut away entirely is never trained on
    max_seq_len: int = 256
    train_on_prompt: bool = False  # False: loss on response tokens only
    # conversations: loss on every assistant turn ("all") or on the last one only ("last")
    train_on_turns: str = "all"
    heldout_per_category: int = 10  # records per category set aside as the global test set
    heldout_path: str = ""  # a records file to use as the held-out set instead of splitting
    max_records: int | None = None  # keep only this many records (after a seeded shuffle)
    # error: a malformed record (empty response, missing field, ...) stops the run, naming
    # file, line and field; skip: it is dropped, and the skipped records are counted and
    # named in the run's log (a file with no good record still fails)
    on_bad_record: str = "error"
    synthetic_per_skill: int = 200  # for path = "synthetic": records generated per skill
    # DPO preference pairs (train.objective = dpo | sft_then_dpo; with sft they are only
    # scored): a .json/.jsonl/.csv file, a Hugging Face dataset name, or "synthetic" (the
    # synthetic skills' records, chosen = the right answer, rejected = a wrong one). They get
    # the same held-out split and partitioner as the records; max_seq_len limits each pair's
    # prompt + response.
    preference_path: str = ""
    # auto | plain | hh | ultrafeedback | conversational (fedit.data.preferences)
    preference_format: str = "auto"
    # plain pairs under other keys: "prompt=question,chosen=good,rejected=bad[,category=c]"
    preference_fields: str = ""
    preference_split: str = "train"  # for Hugging Face datasets (e.g. "train_prefs")
    heldout_preference_path: str = ""  # a pairs file to hold out instead of splitting

    def validate(self) -> None:
        require(
            bool(self.path) or bool(self.preference_path),
            "data.path",
            "is required (a file, a dataset name or 'synthetic')",
        )
        require(
            self.preference_format in PREFERENCE_FORMATS,
            "data.preference_format",
            f"must be one of {', '.join(PREFERENCE_FORMATS)}",
        )
        parse_preference_fields(self.preference_fields)
        require(self.on_bad_record in ON_BAD_RECORD, "data.on_bad_record", "must be error or skip")
        require(self.template in {"alpaca", "chat"}, "data.template", "must be alpaca or chat")
        require(
            self.system_prompt is None or self.template == "chat",
            "data.system_prompt",
            "applies to data.template = 'chat' only",
        )
        require(
            self.train_on_turns in TURNS, "data.train_on_turns", f"must be {' or '.join(TURNS)}"
        )
        require(self.max_seq_len >= 8, "data.max_seq_len", "must be at least 8")
        require(self.heldout_per_category >= 0, "data.heldout_per_category", "must be >= 0")
        require(self.max_records is None or self.max_records > 0, "data.max_records", "must be > 0")


# "files": data.path is a glob of pre-partitioned client files, one file per client
PARTITION_METHODS = ("category_shards", "dirichlet", "iid", "quantity_skew", "files")


@dataclass
class PartitionConfig:
    """How training records are split over clients (see fedit.data.partition)."""

    # category_shards (the FedIT paper: category-sorted, 2N shards, two per client) | dirichlet |
    # iid | quantity_skew | files (data.path is a glob, one file per client)
    method: str = "category_shards"
    # N, the number of clients; with method = "files", unless typed, the number of files
    # data.path (or data.preference_path) matches (a typed value must match it)
    num_clients: int = 10
    shards_per_client: int = 2  # category_shards: the FedIT paper's 2N shards, two per client
    alpha: float = 0.5  # dirichlet concentration (smaller = more skewed)
    min_client_size: int = 2  # dirichlet / quantity_skew: resample until every client has this many
    quantity_sigma: float = 1.0  # quantity_skew: log-normal sigma of client sizes

    def validate(self) -> None:
        require(
            self.method in PARTITION_METHODS,
            "partition.method",
            f"must be one of {', '.join(PARTITION_METHODS)}",
        )
        require(self.num_clients >= 1, "partition.num_clients", "must be >= 1")
        require(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")
        require(self.alpha > 0, "partition.alpha", "must be positive")
        require(self.min_client_size >= 0, "partition.min_client_size", "must be >= 0")
        require(self.quantity_sigma > 0, "partition.quantity_sigma", "must be positive")


def clients_from_files(data: DataConfig, partition: PartitionConfig) -> None:
    """With partition.method = "files" and partition.num_clients not typed, N is the number
    of files the data.path glob (or, for DPO-only data, data.preference_path) matches. None
    matching (a coordinator holds no client file) leaves N as it is; reading the records
    then names the glob that matched nothing."""
    pattern = data.path or data.preference_path
    if partition.method == "files" and pattern:
        matches = glob.glob(pattern)
        if matches:
            partition.num_clients = len(matches)
