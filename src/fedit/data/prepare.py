"""From a run config to the records a run trains and evaluates on.

``load_split_records(cfg)`` reads (or generates) the records, keeps at most
``data.max_records`` of them, and sets aside the global held-out test set. The
``partition`` command and the engine both call it, so they always see the same split.
"""

from __future__ import annotations

import numpy as np

from fedit.config import RunConfig
from fedit.data.partition import split_heldout
from fedit.data.readers import read_records
from fedit.data.records import Record


def cap_records(records: list[Record], max_records: int | None, seed: int) -> list[Record]:
    """A seeded shuffle then the first `max_records` (all records when None or enough)."""
    if max_records is None or max_records >= len(records):
        return records
    order = np.random.default_rng(seed).permutation(len(records))[:max_records]
    return [records[i] for i in order]


def load_split_records(cfg: RunConfig) -> tuple[list[Record], list[Record]]:
    """Read the configured records, cap them, and split off the held-out set: (train, heldout)."""
    if cfg.data.path == "synthetic":
        from fedit.data.synthetic import generate_records

        records = generate_records(cfg.data.synthetic_per_skill, cfg.seed)
    else:
        records = read_records(cfg.data.path, cfg.data.fields, cfg.data.split)
    records = cap_records(records, cfg.data.max_records, cfg.seed)
    return split_heldout(records, cfg.data.heldout_per_category, cfg.seed)
