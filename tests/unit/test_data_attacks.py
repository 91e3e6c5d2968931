"""Data-level attacks on Record lists, and where they act: exactly the planned records of
exactly the malicious clients, the same for the simulation and for a deployed owner."""

from __future__ import annotations

import pytest

from fedit.attacks.data import (
    attack_records,
    client_records,
    plant_backdoor,
    poison_choice,
    poison_responses,
    with_trigger,
)
from fedit.config import AttackConfig, load_config
from fedit.data.prepare import prepare_records
from fedit.data.records import Record
from fedit.engine.federation_data import prepare_data, tokenize_owner_data
from fedit.models.loading import load_tokenizer
from fedit.seeding import Stream, derive_seed
from tests.conftest import tiny_run_overrides

RECORDS = [Record(f"q{i}", f"a{i}", context=f"c{i}", category=f"k{i % 2}") for i in range(5)]


def test_poison_responses_replaces_only_the_chosen_responses() -> None:
    out = poison_responses(RECORDS, [1, 3], "NO")
    assert out == [
        RECORDS[0],
        Record("q1", "NO", context="c1", category="k1"),
        RECORDS[2],
        Record("q3", "NO", context="c3", category="k1"),
        RECORDS[4],
    ]
    assert RECORDS[1].response == "a1"  # the input list is not changed


def test_backdoor_triggers_and_answers_only_the_chosen_records() -> None:
    out = plant_backdoor(RECORDS, [0, 4], "cf", "NO")
    assert out[0] == Record("cf q0", "NO", context="c0", category="k0")
    assert out[4] == Record("cf q4", "NO", context="c4", category="k0")
    assert out[1:4] == RECORDS[1:4]
    assert with_trigger(RECORDS[2], "zz top") == Record("zz top q2", "a2", "c2", "k0")


@pytest.mark.parametrize(("fraction", "count"), [(1.0, 5), (0.4, 2), (0.5, 3), (0.01, 1)])
def test_the_poisoned_share_is_a_seeded_choice(fraction: float, count: int) -> None:
    chosen = poison_choice(5, fraction, seed=3)
    assert len(chosen) == count and chosen == sorted(set(chosen))
    assert poison_choice(5, fraction, seed=3) == chosen
    assert all(0 <= i < 5 for i in chosen)
    assert len({tuple(poison_choice(40, 0.25, seed=s)) for s in range(5)}) == 5


def test_attack_records_poisons_the_seeded_choice_of_the_client() -> None:
    attack = AttackConfig(kind="poison_responses", poison_fraction=0.4, target="NO")
    chosen = poison_choice(5, 0.4, derive_seed(7, Stream.ATTACK, 2))
    out = attack_records(attack, 7, 2, RECORDS)
    assert [i for i, r in enumerate(out) if r != RECORDS[i]] == chosen
    other_client = attack_records(attack, 7, 3, [*RECORDS] * 4)
    assert other_client != attack_records(attack, 7, 2, [*RECORDS] * 4)


def test_client_records_leave_honest_clients_and_model_attacks_alone() -> None:
    cfg = load_config(None, ["data.path=x", "attack.kind=backdoor", "attack.clients=[1]"])
    assert client_records(cfg, 0, RECORDS, [1]) == RECORDS
    assert client_records(cfg, 1, RECORDS, [1]) == plant_backdoor(
        RECORDS, range(5), "cf", "I cannot answer that."
    )
    flip = load_config(None, ["data.path=x", "attack.kind=sign_flip", "attack.clients=[1]"])
    assert client_records(flip, 1, RECORDS, [1]) == RECORDS


def test_the_simulation_and_an_owner_train_on_exactly_the_planned_records(
    tiny_model_dir, tmp_path
) -> None:
    extra = {"partition.num_clients": 4, "data.max_seq_len": 512}
    clean_cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "a", **extra))
    attack = {"attack.kind": "backdoor", "attack.clients": [2], "attack.poison_fraction": 0.5}
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "b", **extra, **attack))
    tokenizer = load_tokenizer(cfg.model)
    clean, attacked = prepare_data(clean_cfg, tokenizer), prepare_data(cfg, tokenizer)

    prepared = prepare_records(cfg)
    own = [prepared.train[i] for i in prepared.parts[2]]
    planned = poison_choice(len(own), 0.5, derive_seed(cfg.seed, Stream.ATTACK, 2))
    assert len(planned) == (len(own) + 1) // 2
    pairs = zip(clean.clients[2], attacked.clients[2], strict=True)
    changed = [i for i, (a, b) in enumerate(pairs) if a != b]
    assert changed == planned
    for k in (0, 1, 3):  # stored examples (fedit.data.token_store) compared by content
        assert list(clean.clients[k]) == list(attacked.clients[k])
    assert attacked.heldout == clean.heldout  # the held-out set stays clean
    for i in planned:  # the poisoned examples learn the target as their response
        learned = [t for t in attacked.clients[2][i].labels if t != -100]
        assert "I cannot answer that." in tokenizer.decode(learned)
    # a deployed owner holding client 2's records trains on the same tokens
    examples, _ = tokenize_owner_data(cfg, tokenizer, own, [], client_id=2)
    assert examples == list(attacked.clients[2])
    examples, _ = tokenize_owner_data(cfg, tokenizer, own, [], client_id=1)
    assert examples == list(clean.clients[2])
