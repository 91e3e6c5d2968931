"""The synthetic multi-skill data and the exact-match scorer that grades it."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from fedit.data.records import Record
from fedit.data.synthetic import SKILL_NAMES, SKILLS, generate_records, wrong_answer
from fedit.eval.exact_match import (
    exact_match,
    format_score_table,
    normalize,
    score_by_category,
)

PER_SKILL = 40  # within every skill's input space (the smallest, capital, has 60)


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return generate_records(per_skill=PER_SKILL, seed=0)


def test_same_seed_same_records_other_seed_differs(records):
    assert generate_records(per_skill=PER_SKILL, seed=0) == records
    assert generate_records(per_skill=PER_SKILL, seed=1) != records


def test_subset_of_skills_gives_the_same_records(records):
    subset = generate_records(per_skill=PER_SKILL, seed=0, skills=["capital", "addition"])
    assert subset == [r for r in records if r.category == "capital"] + [
        r for r in records if r.category == "addition"
    ]


def test_every_skill_present_with_per_skill_records(records):
    assert len(SKILL_NAMES) >= 8
    assert Counter(r.category for r in records) == dict.fromkeys(SKILL_NAMES, PER_SKILL)
    assert all(r.context == "" for r in records)


def test_no_duplicate_instruction_within_a_skill(records):
    for name in SKILL_NAMES:
        instructions = [r.instruction for r in records if r.category == name]
        assert len(set(instructions)) == len(instructions), name


def test_exhausted_input_space_repeats_instead_of_failing():
    capital = generate_records(per_skill=70, seed=0, skills=["capital"])
    assert len(capital) == 70
    assert len({r.instruction for r in capital}) == 60


def test_answers_are_short_single_lines(records):
    for r in records:
        assert "\n" not in r.response and r.response == r.response.strip()
        assert 0 < len(r.response) <= 40, r
        assert len(r.instruction) <= 160, r


def test_scorer_accepts_own_answers_with_surrounding_whitespace(records):
    for r in records:
        assert exact_match(r.response, r.response)
        assert exact_match(f"  {r.response}\n", r.response)
        assert exact_match(f"\n\n{r.response}  \n### Instruction: more", r.response)


def test_wrong_answers_never_match(records):
    rng = random.Random(0)
    for r in records:
        for _ in range(5):
            wrong = wrong_answer(r, rng)
            assert not exact_match(wrong, r.response), (r, wrong)


def test_json_answers_parse():
    for r in generate_records(per_skill=20, seed=3, skills=["name_age_json"]):
        data = json.loads(r.response)
        assert set(data) == {"name", "age"} and isinstance(data["age"], int)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Paris", "Paris", True),
        ("  Paris \n", "Paris", True),
        ("New   York", "New York", True),
        ("paris", "Paris", False),  # case counts
        ("Paris.", "Paris", False),  # punctuation counts
        ("The capital is Paris.", "Paris", False),
        ("", "Paris", False),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


def test_normalize_takes_first_non_empty_line():
    assert normalize("\n  \n a  b \nc") == "a b"
    assert normalize("   ") == ""


def test_score_by_category_means_over_categories():
    # Prepare: category a has 1/4 right, category b 1/1.
    predictions = ["1", "x", "x", "x", "2"]
    references = ["1", "1", "1", "1", "2"]
    categories = ["a", "a", "a", "a", "b"]
    # Execute
    scores = score_by_category(predictions, references, categories)
    # Assert: the mean is (0.25 + 1.0) / 2, not 2 / 5.
    assert scores == {"a": 0.25, "b": 1.0, "mean": 0.625}


def test_score_by_category_rejects_mismatched_or_empty():
    with pytest.raises(ValueError):
        score_by_category(["a"], ["a", "b"], ["c"])
    with pytest.raises(ValueError):
        score_by_category([], [], [])


def test_format_score_table():
    rows = {"Base": {"a": 0.0, "b": 0.125, "mean": 0.0625}, "FedIT": {"a": 1.0, "mean": 1.0}}
    table = format_score_table(rows, ["a", "b", "mean"])
    assert table.splitlines() == [
        "| model | a | b | mean |",
        "|---|---:|---:|---:|",
        "| Base | 0.00 | 0.12 | 0.06 |",
        "| FedIT | 1.00 | - | 1.00 |",
    ]


def test_unknown_skill_and_category_rejected():
    with pytest.raises(ValueError, match="unknown skills"):
        generate_records(per_skill=1, seed=0, skills=["juggling"])
    with pytest.raises(ValueError):
        wrong_answer(Record("q", "a", category="default"), random.Random(0))


def test_skills_registry_matches_names():
    assert tuple(SKILLS) == SKILL_NAMES
    assert all(name.isidentifier() and name.islower() for name in SKILL_NAMES)
