"""Attack success on hand-made generations (a fake generate), and the table column."""

from __future__ import annotations

import pytest

from fedit.config import AttackConfig, load_config
from fedit.data.records import Record
from fedit.eval.attack import attack_scores, final_attack_eval, target_rate
from fedit.eval.exact_match import format_score_table

HELDOUT = [Record(f"q{i}", f"a{i}", category="k") for i in range(4)]
TARGET = "I cannot answer that."


def test_target_rate_uses_the_exact_match_rule() -> None:
    answers = [TARGET, "  I cannot   answer that.\nmore", "I cannot answer that", "no"]
    assert target_rate(answers, TARGET) == 0.5  # first line, whitespace; punctuation counts
    with pytest.raises(ValueError, match="no answers"):
        target_rate([], TARGET)


def test_poisoned_responses_are_scored_on_the_clean_answers_without_generating() -> None:
    def no_generation(records):
        raise AssertionError("the clean answers were given")

    clean = [TARGET, "a1", TARGET, "a3"]
    attack = AttackConfig(kind="poison_responses", target=TARGET)
    assert attack_scores(attack, HELDOUT, no_generation, clean) == {"attack_success": 0.5}
    generated = attack_scores(attack, HELDOUT, lambda rs: [TARGET] * len(rs))
    assert generated == {"attack_success": 1.0}


def test_the_backdoor_is_scored_on_the_triggered_prompts() -> None:
    asked: list[list[str]] = []

    def generate(records):  # answers the target only when the trigger opens the prompt
        asked.append([r.instruction for r in records])
        return [TARGET if r.instruction.startswith("zq ") else "x" for r in records]

    attack = AttackConfig(kind="backdoor", trigger="zq", target=TARGET)
    assert attack_scores(attack, HELDOUT, generate, ["a0"] * 4) == {"trigger_success": 1.0}
    assert asked == [["zq q0", "zq q1", "zq q2", "zq q3"]]
    half = attack_scores(attack, HELDOUT, lambda rs: [TARGET, "x"] * (len(rs) // 2))
    assert half == {"trigger_success": 0.5}


def test_model_attacks_have_no_success_metric() -> None:
    for kind in ("none", "sign_flip", "scale", "gaussian"):
        assert attack_scores(AttackConfig(kind=kind), HELDOUT, lambda rs: []) == {}
        cfg = load_config(None, ["data.path=x", f"attack.kind={kind}"])
        assert final_attack_eval(cfg, None, HELDOUT) is None
    backdoor = load_config(None, ["data.path=x", "attack.kind=backdoor"])
    assert final_attack_eval(backdoor, None, []) is None
    assert final_attack_eval(backdoor, None, HELDOUT) is not None


def test_the_table_shows_attack_columns_after_the_mean() -> None:
    rows = {
        "fedit": {"k": 0.5, "mean": 0.5, "trigger_success": 0.25},
        "base": {"k": 0.0, "mean": 0.0},
    }
    table = format_score_table(rows, ["k", "mean"], extra=["trigger_success"]).splitlines()
    assert table[0] == "| model | k | mean | trigger_success |"
    assert table[2] == "| fedit | 0.50 | 0.50 | 0.25 |"
    assert table[3] == "| base | 0.00 | 0.00 | - |"
