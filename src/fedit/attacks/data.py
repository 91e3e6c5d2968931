"""Data-level attacks: what a malicious client trains on instead of its own records.

Both change ``attack.poison_fraction`` of the client's records, a choice seeded by
(run seed, Stream.ATTACK, client): poison_responses replaces their responses by
``attack.target`` (every poisoned answer one fixed wrong or harmful string);
backdoor also prepends ``attack.trigger`` to their instructions, so the model learns to
answer ``target`` when the trigger is there, and the clean records it keeps hide that
from a quality check on untriggered prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fedit.attacks import ceil_share
from fedit.config import DATA_ATTACKS, AttackConfig, RunConfig
from fedit.data.records import Record
from fedit.seeding import Stream, derive_seed


def with_trigger(record: Record, trigger: str) -> Record:
    """The record with ``trigger + " "`` before its instruction."""
    return replace(record, instruction=f"{trigger} {record.instruction}")


def poison_choice(num_records: int, fraction: float, seed: int) -> list[int]:
    """The sorted indices of ceil(fraction · n) of n records, drawn by ``seed``."""
    order = np.random.default_rng(seed).permutation(num_records)
    return sorted(int(i) for i in order[: ceil_share(fraction, num_records)])


def poison_responses(records: Sequence[Record], chosen: Sequence[int], target: str) -> list[Record]:
    """The records with the response of those at ``chosen`` replaced by ``target``."""
    picked = set(chosen)
    return [replace(r, response=target) if i in picked else r for i, r in enumerate(records)]


def plant_backdoor(
    records: Sequence[Record], chosen: Sequence[int], trigger: str, target: str
) -> list[Record]:
    """The records with those at ``chosen`` triggered and answered by ``target``."""
    picked = set(chosen)
    return [
        replace(with_trigger(r, trigger), response=target) if i in picked else r
        for i, r in enumerate(records)
    ]


def attack_records(
    attack: AttackConfig, run_seed: int, client_id: int, records: Sequence[Record]
) -> list[Record]:
    """A malicious client's records after its data attack (``attack.kind`` a data attack)."""
    seed = derive_seed(run_seed, Stream.ATTACK, client_id)
    chosen = poison_choice(len(records), attack.poison_fraction, seed)
    if attack.kind == "poison_responses":
        return poison_responses(records, chosen, attack.target)
    if attack.kind == "backdoor":
        return plant_backdoor(records, chosen, attack.trigger, attack.target)
    raise ValueError(f"not a data attack: {attack.kind!r}")


def client_records(
    cfg: RunConfig, client_id: int, records: Sequence[Record], malicious: Sequence[int]
) -> list[Record]:
    """The records client ``client_id`` trains on: its own, or, when it is in ``malicious``
    (fedit.attacks.malicious_clients) under a data attack, the poisoned ones."""
    if cfg.attack.kind not in DATA_ATTACKS or client_id not in malicious:
        return list(records)
    return attack_records(cfg.attack, cfg.seed, client_id, records)
