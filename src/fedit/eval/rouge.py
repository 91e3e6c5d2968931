"""ROUGE-L per category with Google's maintained `rouge-score` implementation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from rouge_score import rouge_scorer


def rouge_l_by_category(
    predictions: Sequence[str], references: Sequence[str], categories: Sequence[str]
) -> dict[str, float]:
    """Mean ROUGE-L F1 per category, plus 'mean' over categories (not over records)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per_category: dict[str, list[float]] = defaultdict(list)
    for prediction, reference, category in zip(predictions, references, categories, strict=True):
        per_category[category].append(scorer.score(reference, prediction)["rougeL"].fmeasure)
    scores = {c: sum(v) / len(v) for c, v in per_category.items()}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores
