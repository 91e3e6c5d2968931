"""A round's metrics line and console line (fedit.engine.round_record), on hand-built rounds."""

from __future__ import annotations

from types import SimpleNamespace

from fedit.config import TrainConfig
from fedit.engine.round_record import round_line, round_record
from fedit.engine.runner import RoundPlan, RoundReplies
from fedit.types import Rejection


def plan(probed: dict[int, float] | None = None) -> RoundPlan:
    return RoundPlan(1, "sft", TrainConfig(), 0.01, [], probed=probed or {})


STRATEGY = SimpleNamespace(
    metrics=lambda: {"server_lr": 1.0},
    aggregator=SimpleNamespace(metrics=lambda: {"kept": 2}),
)


def test_a_plain_round_has_the_five_fixed_keys_and_the_clients_traffic() -> None:
    replies = RoundReplies(updates=[], traffic={3: {"bytes_down": 10, "bytes_up": 20}})
    clients = [{"id": 3, "num_examples": 4, "train_loss": 1.5}]
    quiet = SimpleNamespace(metrics=dict, aggregator=SimpleNamespace(metrics=dict))
    record = round_record(plan(), replies, clients, [], quiet, {})
    assert record == {
        "round": 2,
        "objective": "sft",
        "learning_rate": 0.01,
        "clients": [
            {"id": 3, "num_examples": 4, "train_loss": 1.5, "bytes_down": 10, "bytes_up": 20}
        ],
        "strategy": {},
    }


def test_every_optional_section_comes_in_its_fixed_order() -> None:
    replies = RoundReplies(updates=[], dropped=[Rejection(5, "timeout")])
    attack = {"kind": "sign_flip", "clients": [1]}
    record = round_record(
        plan({4: 2.5}), replies, [], [Rejection(1, "non-finite")], STRATEGY, attack
    )
    assert list(record) == [
        "round", "objective", "learning_rate", "clients", "strategy",
        "selection", "aggregator", "attack", "rejected", "dropped",
    ]  # fmt: skip
    assert record["selection"] == {"probed_loss": {"4": 2.5}}
    assert record["strategy"] == {"server_lr": 1.0} and record["aggregator"] == {"kept": 2}
    assert record["rejected"] == [{"client": 1, "reason": "non-finite"}]
    assert record["dropped"] == [{"client": 5, "reason": "timeout"}]
    assert record["attack"] == attack and record["attack"] is not attack  # a copy per line


def test_a_round_that_aggregated_nothing_has_no_strategy_or_aggregator_metrics() -> None:
    record = round_record(plan(), RoundReplies(updates=[]), [], [], None, {})
    assert record["strategy"] == {} and "aggregator" not in record


def test_the_console_line_names_each_score_the_record_holds() -> None:
    record = {
        "round": 3,
        "objective": "dpo",
        "clients": [{"id": 0, "train_loss": 0.5}, {"id": 1, "train_loss": 0.7}],
        "heldout": {"overall": {"loss": 1.23456}},
        "heldout_dpo": {"overall": {"accuracy": 0.75, "margin": 0.01234}},
        "attack": {"kind": "backdoor", "trigger_success": 0.5},
        "privacy": {"epsilon": 14.44, "accountant": "pld", "delta": 0.04},
        "dropped": [{"client": 4, "reason": "timeout"}],
        "seconds": 2.345,
    }
    assert round_line(record) == (
        "round 3: dpo loss 0.6000 held-out loss 1.2346 held-out preference accuracy 0.750 "
        "margin 0.0123 trigger success 0.50 ε 14.4 (PLD, δ 0.04) dropped [4] (2.3s)"
    )
    assert round_line({"round": 0, "heldout": {"overall": {"loss": 2.0}}}) == (
        "round 0: held-out loss 2.0000"
    )
