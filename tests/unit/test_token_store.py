"""The on-disk token store: examples read back exactly, views, pooling, refusals."""

from __future__ import annotations

import itertools

import pytest

from fedit.data.records import Record
from fedit.data.token_store import TokenStore, pooled
from fedit.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_records
from fedit.models.tiny import byte_tokenizer

RECORDS = [
    Record("Name a color.", "Red.", category="open_qa"),
    Record("Sum the numbers.", "3", context="1, 2", category="math"),
    Record("Say hi.", "Hello there, friend.", category="open_qa"),
]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_examples_read_back_exactly(train_on_prompt: bool) -> None:
    examples, _ = tokenize_records(
        RECORDS, byte_tokenizer(), "alpaca", 1024, train_on_prompt=train_on_prompt
    )
    store = TokenStore()
    first, second = store.add(examples[:2]), store.add(examples[2:])
    assert list(first) == examples[:2]
    assert [second[0]] == examples[2:]
    assert len(first) == 2 and len(second) == 1
    assert first[1].category == "math" and first[-1] == examples[1]


def test_truncated_examples_and_empty_clients() -> None:
    examples, report = tokenize_records(RECORDS, byte_tokenizer(), "alpaca", 160)
    # responses cut at max_seq_len still read back as written
    assert len(examples) == 2 and report.truncated == 2
    store = TokenStore()
    empty, client = store.add([]), store.add(examples)
    assert not empty and list(client) == examples
    assert list(TokenStore().add([])) == []  # nothing written: nothing to map


def test_pooled_views_keep_client_order() -> None:
    examples, _ = tokenize_records(RECORDS, byte_tokenizer(), "alpaca", 1024)
    store = TokenStore()
    views = [store.add([e]) for e in examples]
    assert list(pooled(views[::-1])) == examples[::-1]
    with pytest.raises(ValueError, match="different stores"):
        pooled([views[0], TokenStore().add(examples)])


def test_no_writes_after_reading() -> None:
    examples, _ = tokenize_records(RECORDS, byte_tokenizer(), "alpaca", 1024)
    store = TokenStore()
    store.add(examples)[0]
    with pytest.raises(RuntimeError, match="add every client first"):
        store.add(examples)


def test_a_conversation_with_several_labelled_turns_reads_back_exactly() -> None:
    history = (("system", "Be brief."), ("user", "2+3?"), ("assistant", "5"))
    chat = Record("Times 4?", "20", "", "conversation", history)
    examples, _ = tokenize_records([chat, RECORDS[0]], byte_tokenizer(), "chat", 1024)
    labelled = [label != IGNORE_INDEX for label in examples[0].labels]
    assert sum(a != b for a, b in itertools.pairwise(labelled)) == 4  # two separate spans
    store = TokenStore()
    assert list(store.add(examples)) == examples
    gap = TokenizedExample([5, 6, 7], [5, IGNORE_INDEX, 7], "x")
    assert TokenStore().add([gap])[0] == gap


@pytest.mark.parametrize(
    "labels",
    [
        [IGNORE_INDEX, 5, 9],  # a label that is not the id beneath it
        [IGNORE_INDEX, 6],  # shorter than the ids
    ],
)
def test_refuses_labels_it_cannot_rebuild(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="masked examples only"):
        TokenStore().add([TokenizedExample([5, 6, 7], labels, "x")])
