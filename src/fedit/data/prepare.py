"""From a run config to the records a run trains and evaluates on, split over clients.

``prepare_records(cfg)`` is the one place that reads (or generates) records, caps them,
sets aside the global held-out set and partitions the rest over clients. The
``partition`` command, the engine and the comparison driver all call it, so they always
see the same split. With ``partition.method = "files"`` the clients come pre-partitioned:
``data.path`` is a glob and every matching file is one client's records.

``prepare_preferences(cfg)`` does the same for DPO preference pairs (``data.preference_path``):
the same cap, per-category held-out split and partitioner, so the two sets are split alike
(with the same seed and synthetic data they hold out the same prompts).
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedit.config import ConfigError, RunConfig
from fedit.data.partition import partition_records, split_heldout
from fedit.data.preferences import PreferencePair, read_preferences, synthetic_pairs
from fedit.data.readers import read_records
from fedit.data.records import Record

T = TypeVar("T")


@dataclass
class PreparedRecords:
    train: list[Record]
    heldout: list[Record]
    parts: list[list[int]]  # per client, indices into train
    removed_duplicates: int  # training records dropped because a held-out record equals them


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


def _read_source(cfg: RunConfig) -> list[Record]:
    if cfg.data.path == "synthetic":
        from fedit.data.synthetic import generate_records

        return generate_records(cfg.data.synthetic_per_skill, cfg.seed)
    return read_records(cfg.data.path, cfg.data.fields, cfg.data.split)


def drop_heldout_duplicates(train: list[Record], heldout: list[Record]) -> tuple[list[Record], int]:
    """Training records whose prompt equals a held-out prompt would leak the test set."""
    seen = {(r.instruction, r.context) for r in heldout}
    kept = [r for r in train if (r.instruction, r.context) not in seen]
    return kept, len(train) - len(kept)


def prepare_records(cfg: RunConfig) -> PreparedRecords:
    """(train, held-out, per-client index lists) for a run config."""
    data = cfg.data
    if not data.path:  # a DPO-only config: its pairs come from prepare_preferences
        raise ConfigError("data.path: not set, so this run has no instruction records")
    heldout_file = read_records(data.heldout_path, data.fields) if data.heldout_path else None
    if cfg.partition.method == "files":
        files = client_files(data.path, cfg.partition.num_clients)
        per_client = [read_records(f, data.fields) for f in files]
        train = [r for records in per_client for r in records]
        bounds = np.cumsum([0] + [len(r) for r in per_client])
        parts = [list(range(bounds[i], bounds[i + 1])) for i in range(len(per_client))]
        return PreparedRecords(train, heldout_file or [], parts, 0)
    records = cap_records(_read_source(cfg), data.max_records, cfg.seed)
    if heldout_file is None:
        train, heldout = split_heldout(records, data.heldout_per_category, cfg.seed)
    else:
        train, heldout = records, heldout_file
    train, removed = drop_heldout_duplicates(train, heldout)
    parts = partition_records(train, cfg.partition, cfg.seed)
    return PreparedRecords(train, heldout, parts, removed)


def load_heldout(cfg: RunConfig) -> list[Record]:
    """Only the held-out records of a run config (for evaluation commands)."""
    if cfg.data.heldout_path:
        return read_records(cfg.data.heldout_path, cfg.data.fields)
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
    return read_preferences(source, data.preference_format, data.preference_split)


def prepare_preferences(cfg: RunConfig) -> PreparedPreferences:
    """(train, held-out, per-client index lists) of the preference pairs of a run config.

    Mirrors ``prepare_records``: ``data.max_records`` caps the pairs, ``data.heldout_per_category``
    pairs per category are held out, training pairs whose prompt is a held-out prompt are
    dropped, and the configured partitioner splits the rest. With ``partition.method =
    "files"``, ``data.preference_path`` is a glob of one file per client and nothing is held
    out; ``data.heldout_preference_path`` names a held-out pairs file instead of a split.
    """
    data = cfg.data
    heldout_file = (
        _read_preference_source(cfg, data.heldout_preference_path)
        if data.heldout_preference_path
        else None
    )
    if cfg.partition.method == "files":
        files = client_files(data.preference_path, cfg.partition.num_clients)
        per_client = [_read_preference_source(cfg, f) for f in files]
        train = [p for pairs in per_client for p in pairs]
        bounds = np.cumsum([0] + [len(p) for p in per_client])
        parts = [list(range(bounds[i], bounds[i + 1])) for i in range(len(per_client))]
        return PreparedPreferences(train, heldout_file or [], parts, 0)
    pairs = cap_records(
        _read_preference_source(cfg, data.preference_path), data.max_records, cfg.seed
    )
    if heldout_file is None:
        train, heldout = split_heldout(pairs, data.heldout_per_category, cfg.seed)
    else:
        train, heldout = pairs, heldout_file
    prompts = {p.prompt for p in heldout}
    kept = [p for p in train if p.prompt not in prompts]
    parts = partition_records(kept, cfg.partition, cfg.seed)
    return PreparedPreferences(kept, heldout, parts, len(train) - len(kept))
