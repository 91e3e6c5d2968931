"""The judge's pure parts: verdict and rating parsing, both orders and ties, the summary's
counts, consistency and position bias, seeded intervals, and the question file's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedit.data.records import DataFormatError
from fedit.eval.judge import (
    PairOutcome,
    bootstrap_interval,
    pair_messages,
    pairwise_summary,
    parse_rating,
    parse_verdict,
    single_summary,
)
from fedit.eval.judge_run import read_questions


def test_verdicts_and_ratings_are_the_last_bracketed_ones() -> None:
    assert parse_verdict("A is fine, but [[B]]") == "B"
    assert parse_verdict("first [[A]] then, on reflection, [[ C ]]") == "C"
    assert parse_verdict("Assistant A is better.") is None
    assert parse_rating("Rating: [[7]]") == 7.0 and parse_rating("[[3]] ... [[8.5]]") == 8.5
    assert parse_rating("Rating: [[11]]") is None and parse_rating("no rating") is None


def test_a_win_needs_both_orders_and_anything_else_is_a_tie() -> None:
    assert PairOutcome("A", "B").result == "a"  # a chosen first and second
    assert PairOutcome("B", "A").result == "b"
    assert PairOutcome("A", "A").result == "tie"  # the first shown both times: position
    assert PairOutcome("C", "C").result == "tie" and PairOutcome("A", "C").result == "tie"
    assert PairOutcome(None, "A").result is None


def test_the_summary_counts_reports_consistency_and_position_bias() -> None:
    outcomes = [PairOutcome("A", "B")] * 3 + [PairOutcome("A", "A"), PairOutcome(None, "B")]
    s = pairwise_summary(outcomes)
    assert (s["a_wins"], s["b_wins"], s["ties"], s["unparsed"]) == (3, 0, 1, 1)
    assert s["a_win_rate"] == pytest.approx(3.5 / 4)
    low, high = s["a_win_rate_ci95"]
    assert low <= s["a_win_rate"] <= high <= 1
    assert s["consistency"] == pytest.approx(3 / 4)
    assert s["first_position_share"] == pytest.approx(5 / 9)  # 5 of 9 verdicts for "A"
    assert pairwise_summary(outcomes) == s  # seeded


def test_intervals_and_single_grading() -> None:
    assert bootstrap_interval([5.0] * 10) == (5.0, 5.0)
    low, high = bootstrap_interval([1.0, 10.0] * 10)
    assert 1 < low < 5.5 < high < 10
    s = single_summary([7.0, None, 9.0])
    assert s["mean_rating"] == 8.0 and s["unparsed"] == 1


def test_pairwise_prompts_show_the_answers_in_the_order_given() -> None:
    first, second = pair_messages("Q?", "one", "two"), pair_messages("Q?", "two", "one")
    assert first[1]["content"].index("one") < first[1]["content"].index("two")
    assert second[1]["content"].index("two") < second[1]["content"].index("one")
    assert "[[C]]" in first[0]["content"]


def test_question_files_are_checked_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text(
        '{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Again"]}\n'
        '\n{"id": "x", "question": "Add 2 and 3."}\n'
    )
    questions = read_questions(good)
    assert [(q.id, q.text, q.category) for q in questions] == [
        ("81", "Write a haiku.", "writing"),
        ("x", "Add 2 and 3.", ""),
    ]
    for text, message in [
        ("{not json\n", "q.jsonl:1: not valid JSON"),
        ('{"question": "hi"}\n', 'q.jsonl:1: needs a "question_id"'),
        ('{"id": 1}\n', 'q.jsonl:1: needs a non-empty "question"'),
        ('{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n', "q.jsonl:2: question_id"),
        ("", "no questions"),
    ]:
        good.write_text(text)
        with pytest.raises(DataFormatError, match=message):
            read_questions(good)
