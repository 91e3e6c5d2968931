"""Exact-match scoring per category, and the markdown score table the README demo prints.

Scoring rule (``normalize``): the first non-empty line of the text, stripped, with runs of
whitespace collapsed to one space. Case and punctuation count, since some skills are about
exactly those (``uppercase``, ``name_age_json``). Only the first line is scored because a small
model that has not learned to stop may ramble on after a correct answer (for instance with a
new "### Instruction:"); every synthetic answer is a single line, and a model that answers in
a sentence still fails.
"""

from __future__ import annotations

from collections.abc import Sequence


def normalize(text: str) -> str:
    """The first non-empty line of ``text``, stripped, with inner whitespace collapsed."""
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` equals ``reference`` after ``normalize`` of both."""
    return normalize(prediction) == normalize(reference)


def score_by_category(
    predictions: Sequence[str], references: Sequence[str], categories: Sequence[str]
) -> dict[str, float]:
    """Exact-match rate per category (in order of first appearance), plus ``"mean"``.

    ``"mean"`` averages the categories, not the records, so every skill weighs the same
    whatever its number of test questions.
    """
    if not len(predictions) == len(references) == len(categories):
        raise ValueError(
            f"lengths differ: {len(predictions)} predictions, {len(references)} references, "
            f"{len(categories)} categories"
        )
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    hits: dict[str, list[bool]] = {}
    for prediction, reference, category in zip(predictions, references, categories, strict=True):
        hits.setdefault(category, []).append(exact_match(prediction, reference))
    scores = {category: sum(matched) / len(matched) for category, matched in hits.items()}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def format_score_table(
    rows: dict[str, dict[str, float]],
    categories: Sequence[str],
    digits: int = 2,
    extra: Sequence[str] = (),
) -> str:
    """A markdown table: one row per model, one column per category, then ``mean``, then
    the ``extra`` columns (e.g. an attack's success beside the clean score).

    Values have `digits` decimals; a score a row lacks shows as "-". ``categories`` may include
    "mean" (e.g. the keys of a ``score_by_category`` result); it is shown once, after them.
    """
    columns = [*(c for c in categories if c != "mean"), "mean", *extra]
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model, scores in rows.items():
        cells = [f"{scores[c]:.{digits}f}" if c in scores else "-" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
