"""Every client's tokenised examples packed on disk, read back only for clients that train.

A simulation tokenises all its clients' records once. Held as Python lists, the token ids
and labels of Dolly alone take ~90 MiB of memory, and a cross-device federation's records
grow with its clients, while a round trains only a few of them. ``TokenStore`` keeps the
ids of every example in one unnamed temporary file (int32, memory-mapped for reading:
the operating system pages in what is read and may drop it again), plus small arrays per
example (offset, length, category, its labelled spans). Labels need no space of their
own: fedit's tokenisation (fedit.data.tokenize.tokenize_records) labels an example with its
own ids, -100 outside the responses (one span for a single-turn record, one per trained
assistant turn for a conversation, the whole example with ``train_on_prompt``), so the
spans rebuild them exactly. A client's examples are a ``StoredExamples`` view;
indexing one builds its ``TokenizedExample`` lists, and nothing of it stays in memory
after the round that used it.

The file lives in the system's temporary directory (``TMPDIR``) and has no name there, so
it disappears with the process however that ends.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from fedit.data.tokenize import IGNORE_INDEX, TokenizedExample

TOKEN_DTYPE = np.int32  # vocabularies stay far below 2**31


class TokenStore:
    """Append clients' examples (``add``) while preparing a run, then read them back."""

    def __init__(self) -> None:
        # open for the store's lifetime: the memory map reads it until the run ends
        self._file = tempfile.TemporaryFile(prefix="fedit-tokens-")  # noqa: SIM115
        self._written = 0  # tokens in the file
        self._offsets: list[int] | np.ndarray = []
        self._lengths: list[int] | np.ndarray = []
        self._span_firsts: list[int] | np.ndarray = []  # per example: its first span
        self._spans: list[tuple[int, int]] | np.ndarray = []  # (start, stop) label spans
        self._category_codes: list[int] | np.ndarray = []
        self._categories: dict[str, int] = {}
        self._tokens: np.ndarray | None = None  # the memory map, once reading starts

    def add(self, examples: Iterable[TokenizedExample]) -> StoredExamples:
        """Write `examples` (one client's) to the store; a view of them, readable once
        every client is added."""
        if self._tokens is not None:
            raise RuntimeError("TokenStore.add after reading started: add every client first")
        first = len(self._offsets)
        for example in examples:
            spans = _label_spans(example)
            ids = np.asarray(example.input_ids, dtype=TOKEN_DTYPE)
            self._file.write(ids.tobytes())
            self._offsets.append(self._written)
            self._lengths.append(len(ids))
            self._span_firsts.append(len(self._spans))
            self._spans.extend(spans)
            code = self._categories.setdefault(example.category, len(self._categories))
            self._category_codes.append(code)
            self._written += len(ids)
        return StoredExamples(self, np.arange(first, len(self._offsets)))

    def example(self, index: int) -> TokenizedExample:
        """Example `index` (in order of ``add``), with its lists built from the file."""
        tokens = self._reader()
        start = int(self._offsets[index])
        ids = tokens[start : start + int(self._lengths[index])].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        last = self._span_firsts[index + 1] if index + 1 < len(self._span_firsts) else None
        for start, stop in self._spans[self._span_firsts[index] : last].tolist():
            labels[start:stop] = ids[start:stop]
        return TokenizedExample(ids, labels, self._names[int(self._category_codes[index])])

    def _reader(self) -> np.ndarray:
        """The memory map of the ids; the first call ends writing and makes the arrays."""
        if self._tokens is None:
            self._file.flush()
            self._offsets = np.asarray(self._offsets, dtype=np.int64)
            self._lengths = np.asarray(self._lengths, dtype=np.int32)
            self._span_firsts = np.asarray(self._span_firsts, dtype=np.int64)
            self._spans = np.asarray(self._spans, dtype=np.int32).reshape(-1, 2)
            self._category_codes = np.asarray(self._category_codes, dtype=np.int32)
            self._names = list(self._categories)
            # np.memmap refuses an empty file; an empty store has nothing to map
            self._tokens = (
                np.memmap(self._file, dtype=TOKEN_DTYPE, mode="r", shape=(self._written,))
                if self._written
                else np.zeros(0, dtype=TOKEN_DTYPE)
            )
        return self._tokens


class StoredExamples(Sequence[TokenizedExample]):
    """Some of a store's examples, in order: a client's, several clients' pooled, or those
    of some categories. Holds their indices only."""

    def __init__(self, store: TokenStore, indices: np.ndarray) -> None:
        self.store, self.indices = store, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> TokenizedExample:  # type: ignore[override]
        return self.store.example(int(self.indices[i]))

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self.store.example(int(i)) for i in self.indices)


def pooled(views: Sequence[StoredExamples]) -> StoredExamples:
    """Several views of one store as one, in order (the centralized baseline's client)."""
    if not views:
        raise ValueError("pooled: no views to pool")
    store = views[0].store
    if any(v.store is not store for v in views):
        raise ValueError("pooled: the views are of different stores")
    return StoredExamples(store, np.concatenate([v.indices for v in views]))


def _label_spans(example: TokenizedExample) -> list[tuple[int, int]]:
    """The (start, stop) runs where the example's labels are not -100; refused unless the
    labels are its ids there (the only labels fedit's tokenisation writes, and all the
    store keeps)."""
    labels, ids = np.asarray(example.labels), np.asarray(example.input_ids)
    trained = labels != IGNORE_INDEX
    if len(labels) != len(ids) or (labels[trained] != ids[trained]).any():
        raise ValueError(
            "TokenStore keeps masked examples only: labels must be -100 or the input id at "
            "each position"
        )
    edges = np.diff(trained.astype(np.int8), prepend=0, append=0)  # +1 starts, -1 stops a run
    starts, stops = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
    return list(zip(starts, stops, strict=True))
