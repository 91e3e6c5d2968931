"""Split training records over federated clients, and set aside a held-out test set.

Every partitioner has one signature, ``fn(records, config, seed) -> list[list[int]]``
(one list of record indices per client), and is registered by one explicit
``@register_partitioner(name)``. ``partition_records`` dispatches on
``config.method`` and checks every record went to exactly one client. All randomness
comes from ``numpy.random.default_rng(seed)``, so a seed always gives the same split.
Partitioners and the held-out split read only each item's ``category``, so SFT records
and DPO preference pairs go through the same code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from fedit.config import PartitionConfig


class Categorized(Protocol):
    """What partitioners see of an item: a Record, a PreferencePair, ..."""

    @property
    def category(self) -> str: ...


Items = Sequence[Categorized]
Partitioner = Callable[[Items, PartitionConfig, int], list[list[int]]]
PARTITIONERS: dict[str, Partitioner] = {}
MAX_DIRICHLET_TRIES = 1000


class PartitionError(ValueError):
    """The records cannot be split as configured; the message says why."""


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    """Make `fn` available as ``partition.method = name``."""

    def register(fn: Partitioner) -> Partitioner:
        PARTITIONERS[name] = fn
        return fn

    return register


def partition_records(records: Items, config: PartitionConfig, seed: int) -> list[list[int]]:
    """Client index lists from the configured partitioner, checked to cover each record once."""
    if config.method not in PARTITIONERS:
        raise PartitionError(
            f"unknown partition method {config.method!r} (known: {', '.join(PARTITIONERS)})"
        )
    if len(records) < config.num_clients:
        raise PartitionError(
            f"{len(records)} records cannot give each of {config.num_clients} clients one"
        )
    parts = PARTITIONERS[config.method](records, config, seed)
    assigned = sorted(i for part in parts for i in part)
    if len(parts) != config.num_clients or assigned != list(range(len(records))):
        raise AssertionError(f"partitioner {config.method!r} did not cover each record once")
    return parts


def _category_codes(records: Items) -> np.ndarray:
    """Each record's category as an int, numbered in sorted category order."""
    names = sorted({r.category for r in records})
    code = {name: i for i, name in enumerate(names)}
    return np.array([code[r.category] for r in records], dtype=np.int64)


@register_partitioner("category_shards")
def category_shards(records: Items, config: PartitionConfig, seed: int) -> list[list[int]]:
    """The FedIT paper's split: category-sorted shards, shards_per_client to each client.

    Indices are stable-sorted by category and cut into num_clients * shards_per_client
    contiguous shards of near-equal size; shard ids are shuffled with the seed and dealt
    out. A shard that straddles a category boundary spans two categories, so a client
    holding two such shards could see four. To keep every client at most
    shards_per_client + 1 categories, straddling shards go first, one per client, to a
    seeded order of clients, and only then are the single-category shards dealt; this is
    deterministic for a seed. (A category smaller than a shard can still make one shard
    span three categories; with Dolly and 100 clients every category is far larger.)
    """
    num_shards = config.num_clients * config.shards_per_client
    if len(records) < num_shards:
        raise PartitionError(
            f"category_shards needs at least num_clients * shards_per_client = {num_shards} "
            f"records, got {len(records)}"
        )
    codes = _category_codes(records)
    shards = np.array_split(np.argsort(codes, kind="stable"), num_shards)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_shards)
    straddling = [s for s in order if codes[shards[s]].min() != codes[shards[s]].max()]
    single = [s for s in order if codes[shards[s]].min() == codes[shards[s]].max()]
    clients = rng.permutation(config.num_clients)
    owned: list[list[int]] = [[] for _ in range(config.num_clients)]
    for k, s in enumerate(straddling):
        owned[clients[k % config.num_clients]].append(s)
    for c in clients:
        while len(owned[c]) < config.shards_per_client:
            owned[c].append(single.pop(0))
    return [sorted(i for s in shard_ids for i in shards[s].tolist()) for shard_ids in owned]


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    return [part.tolist() for part in np.split(indices, np.cumsum(counts)[:-1])]


@register_partitioner("dirichlet")
def dirichlet(records: Items, config: PartitionConfig, seed: int) -> list[list[int]]:
    """Label skew: each category's records go to clients in Dirichlet(alpha) proportions.

    Smaller alpha concentrates a category on fewer clients. Proportions are redrawn
    (from the same seeded generator) until every client has min_client_size records.
    """
    codes = _category_codes(records)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(config.num_clients)]
        for category in range(codes.max() + 1):
            members = rng.permutation(np.flatnonzero(codes == category))
            shares = rng.dirichlet(np.full(config.num_clients, config.alpha))
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client] += chunk.tolist()
        if min(len(p) for p in parts) >= config.min_client_size:
            return [sorted(p) for p in parts]
    raise PartitionError(
        f"dirichlet: no draw in {MAX_DIRICHLET_TRIES} gave every one of {config.num_clients} "
        f"clients min_client_size={config.min_client_size} of {len(records)} records with "
        f"alpha={config.alpha}; raise alpha or lower min_client_size / num_clients"
    )


@register_partitioner("iid")
def iid(records: Items, config: PartitionConfig, seed: int) -> list[list[int]]:
    """Uniformly random records, near-equal client sizes."""
    order = np.random.default_rng(seed).permutation(len(records))
    return [sorted(part.tolist()) for part in np.array_split(order, config.num_clients)]


@register_partitioner("quantity_skew")
def quantity_skew(records: Items, config: PartitionConfig, seed: int) -> list[list[int]]:
    """Random records, client sizes in log-normal(0, sigma) proportions (min_client_size each)."""
    n, clients, floor = len(records), config.num_clients, config.min_client_size
    if n < clients * floor:
        raise PartitionError(
            f"quantity_skew: {n} records cannot give {clients} clients min_client_size={floor} each"
        )
    rng = np.random.default_rng(seed)
    shares = rng.lognormal(0.0, config.quantity_sigma, clients)
    extra = np.floor(shares / shares.sum() * (n - clients * floor)).astype(int)
    # Rounding down leaves a few records over; give them to the largest clients.
    extra[np.argsort(-shares)[: n - clients * floor - extra.sum()]] += 1
    parts = _split_by_counts(rng.permutation(n), floor + extra)
    return [sorted(p) for p in parts]


def heldout_indices(records: Items, per_category: int, seed: int) -> set[int]:
    """The indices of `per_category` random records of each category: the global test set.

    A category with too few records gives fewer, always leaving at least one to train on.
    """
    by_category: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_category.setdefault(record.category, []).append(i)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for category in sorted(by_category):
        members = by_category[category]
        take = min(per_category, len(members) - 1)
        chosen.update(rng.choice(members, size=take, replace=False).tolist())
    return chosen


def category_table(records: Items, parts: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """(sorted categories, counts[client][category]) of a partition."""
    categories = sorted({r.category for r in records})
    counts = []
    for part in parts:
        per = Counter(records[i].category for i in part)
        counts.append([per[c] for c in categories])
    return categories, counts


def format_table(categories: list[str], counts: list[list[int]]) -> str:
    """A plain-text table: one row per client (and a total row), one column per category."""
    header = ["client", "total", *categories]
    totals = [sum(col) for col in zip(*counts, strict=True)] if counts else [0] * len(categories)
    rows = [[str(c), str(sum(row)), *map(str, row)] for c, row in enumerate(counts)]
    rows.append(["all", str(sum(totals)), *map(str, totals)])
    widths = [max(len(line[j]) for line in [header, *rows]) for j in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
        for line in [header, *rows]
    )


def save_heatmap(categories: list[str], counts: list[list[int]], path: str | Path) -> Path:
    """Save a clients x categories heatmap of record counts as an image (e.g. PNG)."""
    # Figure without pyplot renders with Agg and never touches a global GUI backend.
    from matplotlib.figure import Figure

    data = np.array(counts, dtype=float).reshape(len(counts), len(categories))
    height = min(2.0 + 0.25 * len(counts), 30.0)
    fig = Figure(figsize=(2.0 + 0.8 * len(categories), height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="records")
    ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    ax.set_ylabel("client")
    ax.set_title("Records per client and category")
    if data.size <= 400:  # numbers stay legible only on small grids
        threshold = data.max() / 2 if data.size else 0
        for (row, col), value in np.ndenumerate(data):
            color = "black" if value > threshold else "white"
            ax.text(col, row, int(value), ha="center", va="center", fontsize=7, color=color)
    fig.savefig(path, dpi=100)
    return Path(path)
