"""From a run config to the records a run trains and evaluates on, split over clients.

``prepare_records(cfg)`` is the one place that reads (or generates) records, caps them,
sets aside the global held-out set and partitions the rest over clients. The
``partition`` command, the engine and the comparison driver all call it, so they always
see the same split. With ``partition.method = "files"`` the clients come pre-partitioned:
``data.path`` is a glob and every matching file is one client's records, less the held-out
set, which is set aside and removed exactly as for the other partitions; ``data.max_records``
caps the files' records together (a seeded choice, each kept record staying with its file's
client), and ``client_file_map`` names each client's file for the run directory.

``prepare_preferences(cfg)`` does the same for DPO preference pairs (``data.preference_path``):
the same cap, per-category held-out split and partitioner, so the two sets are split alike
(with the same seed and synthetic data they hold out the same prompts).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from fedit.config import ConfigError, RunConfig
from fedit.data.partition import heldout_indices, partition_records
from fedit.data.preferences import PreferencePair, read_preferences, synthetic_pairs
from fedit.data.readers import read_records
from fedit.data.records import Record
from fedit.data.templates import NO_TURNS

T = TypeVar("T")


@dataclass
class PreparedRecords:
    train: list[Record]
    heldout: list[Record]
    parts: list[list[int]]  # per client, indices into train
    removed_duplicates: int  # training records dropped because a held-out record equals them
    skipped: list[str] = field(default_factory=list)  # data.on_bad_record = "skip": the dropped


def cap_records(records: list[T], max_records: int | None, seed: int) -> list[T]:
    """A seeded shuffle then the first `max_records` (all records when None or enough)."""
    if max_records is None or max_records >= len(records):
        return records
    order = np.random.default_rng(seed).permutation(len(records))[:max_records]
    return [records[i] for i in order]


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def client_files(pattern: str, num_clients: int) -> list[str]:
    """The files of a pre-partitioned dataset, in natural order (client_2 before client_10)."""
    paths = sorted(glob.glob(pattern), key=_natural_key)
    if not paths:
        raise ConfigError(f"data.path: no file matches {pattern!r}")
    if len(paths) != num_clients:
        raise ConfigError(
            f"partition.num_clients is {num_clients} but data.path matches {len(paths)} files"
        )
    return paths


def cap_owned(
    items: list[T], owners: list[int], max_records: int | None, seed: int
) -> tuple[list[T], list[int]]:
    """``cap_records`` for per-client files: the same seeded choice of `max_records` items,
    kept in file order, each with its owner."""
    kept = sorted(cap_records(list(range(len(items))), max_records, seed))
    return [items[i] for i in kept], [owners[i] for i in kept]


def client_file_map(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """{client id: {"data.path": its file, ...}} of a run whose partition.method is "files"
    (data.path and data.preference_path globs); empty for other methods, or where the files
    are not here (a coordinator holds none)."""
    if cfg.partition.method != "files":
        return {}
    found: dict[str, dict[str, str]] = {}
    for key in ("path", "preference_path"):
        pattern = getattr(cfg.data, key)
        if pattern and glob.glob(pattern):
            for k, path in enumerate(client_files(pattern, cfg.partition.num_clients)):
                found.setdefault(str(k), {})[f"data.{key}"] = path
    return found


BUILT_IN = ("synthetic", "synthetic_chat")  # data sources generated, not read
DATA_FILE_KEYS = ("path", "heldout_path", "preference_path", "heldout_preference_path")


def data_files(cfg: RunConfig) -> dict[str, list[str]]:
    """{"data.<key>": the local files it names} for each data source of a run config: the
    file, a glob's matches (partition.method = "files"), or none (synthetic data, whose
    generator's parameters are in the config; a Hugging Face dataset name)."""
    found = {}
    for key in DATA_FILE_KEYS:
        source = getattr(cfg.data, key)
        matches = [] if source in ("", *BUILT_IN) else glob.glob(source)
        found[f"data.{key}"] = sorted((p for p in matches if Path(p).is_file()), key=_natural_key)
    return found


def _read_source(cfg: RunConfig, skipped: list[str]) -> list[Record]:
    if cfg.data.path == "synthetic":
        from fedit.data.synthetic import generate_records

        return generate_records(cfg.data.synthetic_per_skill, cfg.seed)
    if cfg.data.path == "synthetic_chat":
        from fedit.data.synthetic import generate_conversations

        return generate_conversations(cfg.data.synthetic_per_skill, cfg.seed)
    return _read(cfg.data.path, cfg, skipped, cfg.data.split)


def _read(path: str, cfg: RunConfig, skipped: list[str], split: str = "train") -> list[Record]:
    """A records file read as data.fields and data.on_bad_record say, skipped ones named
    into `skipped`."""
    data = cfg.data
    return read_records(path, data.fields, split, data.on_bad_record, skipped)


def hold_out(
    items: Sequence[T], heldout_file: list[T] | None, cfg: RunConfig, prompt: Callable[[T], object]
) -> tuple[list[int], list[T], int]:
    """(indices of `items` left to train on, the held-out set, duplicates removed).

    The held-out set is `heldout_file`, or data.heldout_per_category items of each category
    split off `items`; a training item whose prompt is a held-out prompt is removed too,
    since it would leak the test set.
    """
    if heldout_file is None:
        chosen = heldout_indices(items, cfg.data.heldout_per_category, cfg.seed)
        heldout = [items[i] for i in sorted(chosen)]
    else:
        chosen, heldout = set(), heldout_file
    prompts = {prompt(item) for item in heldout}
    rest = [i for i in range(len(items)) if i not in chosen]
    kept = [i for i in rest if prompt(items[i]) not in prompts]
    return kept, heldout, len(rest) - len(kept)


def _read_client_files(pattern: str, cfg: RunConfig, read: Callable[[str], list[T]]):
    """(every client file's items, in client order; the client owning each item)."""
    items: list[T] = []
    owners: list[int] = []
    for k, path in enumerate(client_files(pattern, cfg.partition.num_clients)):
        found = read(path)
        items += found
        owners += [k] * len(found)
    return items, owners


def _split(
    items: list[T],
    owners: list[int] | None,
    heldout_file: list[T] | None,
    cfg: RunConfig,
    prompt: Callable[[T], object],
) -> tuple[list[T], list[T], list[list[int]], int]:
    """(train, held-out, per-client indices into train, duplicates removed): the held-out
    set goes first, then the rest is partitioned, or stays with its file's client
    (`owners`, partition.method = "files"), the same held-out removal either way."""
    kept, heldout, removed = hold_out(items, heldout_file, cfg, prompt)
    train = [items[i] for i in kept]
    if owners is None:
        return train, heldout, partition_records(train, cfg.partition, cfg.seed), removed
    parts: list[list[int]] = [[] for _ in range(cfg.partition.num_clients)]
    for position, i in enumerate(kept):
        parts[owners[i]].append(position)
    return train, heldout, parts, removed


def _record_prompt(record: Record) -> tuple:
    # a conversation's prompt is its last question after the earlier turns
    return record.instruction, record.context, record.history


def _require_turns(template: str, *record_sets: list[Record]) -> None:
    """Refuse conversation records under a template without turns (before any model)."""
    if template != "chat" and any(r.history for records in record_sets for r in records):
        raise ConfigError(f"data.template: {NO_TURNS}")


def _pair_prompt(pair: PreferencePair) -> tuple:
    return pair.prompt, pair.turns


def prepare_records(cfg: RunConfig) -> PreparedRecords:
    """(train, held-out, per-client index lists) for a run config."""
    data = cfg.data
    if not data.path:  # a DPO-only config: its pairs come from prepare_preferences
        raise ConfigError("data.path: not set, so this run has no instruction records")
    skipped: list[str] = []
    heldout_file = _read(data.heldout_path, cfg, skipped) if data.heldout_path else None
    owners = None
    if cfg.partition.method == "files":
        records, owners = _read_client_files(data.path, cfg, lambda path: _read(path, cfg, skipped))
        records, owners = cap_owned(records, owners, data.max_records, cfg.seed)
    else:
        records = cap_records(_read_source(cfg, skipped), data.max_records, cfg.seed)
    _require_turns(data.template, records, heldout_file or [])
    return PreparedRecords(*_split(records, owners, heldout_file, cfg, _record_prompt), skipped)


def load_heldout(cfg: RunConfig) -> list[Record]:
    """Only the held-out records of a run config (for evaluation commands)."""
    if cfg.data.heldout_path:
        return _read(cfg.data.heldout_path, cfg, [])
    return prepare_records(cfg).heldout


@dataclass
class PreparedPreferences:
    train: list[PreferencePair]
    heldout: list[PreferencePair]
    parts: list[list[int]]  # per client, indices into train
    removed_duplicates: int  # training pairs dropped because a held-out pair has their prompt


def _read_preference_source(cfg: RunConfig, source: str) -> list[PreferencePair]:
    data = cfg.data
    if source == "synthetic":
        return synthetic_pairs(data.synthetic_per_skill, cfg.seed)
    return read_preferences(
        source, data.preference_format, data.preference_split, data.preference_fields
    )


def prepare_preferences(cfg: RunConfig) -> PreparedPreferences:
    """(train, held-out, per-client index lists) of the preference pairs of a run config.

    Mirrors ``prepare_records``: ``data.max_records`` caps the pairs, ``data.heldout_per_category``
    pairs per category are held out (``data.heldout_preference_path`` names a held-out pairs
    file instead), training pairs whose prompt is a held-out prompt are dropped, and the
    configured partitioner splits the rest. With ``partition.method = "files"``,
    ``data.preference_path`` is a glob of one file per client, and each client keeps what
    the held-out set leaves of its file.
    """
    data = cfg.data
    heldout_file = (
        _read_preference_source(cfg, data.heldout_preference_path)
        if data.heldout_preference_path
        else None
    )
    owners = None
    if cfg.partition.method == "files":
        pairs, owners = _read_client_files(
            data.preference_path, cfg, lambda path: _read_preference_source(cfg, path)
        )
        pairs, owners = cap_owned(pairs, owners, data.max_records, cfg.seed)
    else:
        pairs = cap_records(
            _read_preference_source(cfg, data.preference_path), data.max_records, cfg.seed
        )
    return PreparedPreferences(*_split(pairs, owners, heldout_file, cfg, _pair_prompt))
