"""LLM-as-judge, the evaluation the FedIT paper (GPT-4 pairwise) and OpenFedLLM (MT-Bench)
report: the judge's prompts, the parsing of its verdicts, and the summaries.

The prompts are MT-Bench's ("pair-v2" and "single-v1", Zheng et al. 2023, "Judging
LLM-as-a-Judge with MT-Bench and Chatbot Arena", FastChat's judge_prompts.jsonl), so scores
compare with what the field publishes. Pairwise judging asks both orders (A first, then B
first): a model wins a question only when the judge picks it in both, anything else is a
tie, as MT-Bench counts it, and the share of verdicts that went to whichever answer was
shown first is the judge's position bias. Intervals are 95% percentile bootstraps over the
questions, seeded, so a summary is reproducible.

Everything here is pure: fedit.eval.judge_run sends the prompts and saves what comes back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. You should choose the "
    "assistant that follows the user's instructions and answers the user's question better. "
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases "
    "and ensure that the order in which the responses were presented does not influence "
    "your decision. Do not allow the length of the responses to influence your evaluation. "
    "Do not favor certain names of the assistants. Be as objective as possible. After "
    "providing your explanation, output your final verdict by strictly following this "
    'format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and '
    '"[[C]]" for a tie.'
)
PAIR_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]"
)
SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_USER = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the "
    "response provided by an AI assistant to the user question displayed below. Your "
    "evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
    "creativity, and level of detail of the response. Begin your evaluation by providing a "
    "short explanation. Be as objective as possible. After providing your explanation, you "
    "must rate the response on a scale of 1 to 10 by strictly following this format: "
    '"[[rating]]", for example: "Rating: [[5]]".\n\n'
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
BOOTSTRAP_RESAMPLES = 2000


def pair_messages(question: str, first: str, second: str) -> list[dict[str, str]]:
    """The judge's chat for one order: `first` is shown as assistant A."""
    user = PAIR_USER.format(question=question, first=first, second=second)
    return [{"role": "system", "content": PAIR_SYSTEM}, {"role": "user", "content": user}]


def single_messages(question: str, answer: str) -> list[dict[str, str]]:
    user = SINGLE_USER.format(question=question, answer=answer)
    return [{"role": "system", "content": SINGLE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or "C" (tie): the judge's last [[X]], None when it gave none."""
    found = VERDICT.findall(text)
    return found[-1] if found else None


def parse_rating(text: str) -> float | None:
    """The last [[n]] of a single-answer grading, None when absent or outside 1-10."""
    found = RATING.findall(text)
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1 <= rating <= 10 else None


@dataclass(frozen=True)
class PairOutcome:
    """One question judged in both orders: each order's verdict as shown (A = the answer
    shown first), and the question's result for the two models ("a", "b", "tie"), or None
    when a verdict could not be parsed."""

    a_first: str | None  # the verdict with model a shown as assistant A
    b_first: str | None  # the verdict with model b shown as assistant A

    @property
    def result(self) -> str | None:
        if self.a_first is None or self.b_first is None:
            return None
        picks = {_pick(self.a_first, "a", "b"), _pick(self.b_first, "b", "a")}
        return picks.pop() if len(picks) == 1 else "tie"  # inconsistent orders: a tie


def _pick(verdict: str, shown_first: str, shown_second: str) -> str:
    return {"A": shown_first, "B": shown_second, "C": "tie"}[verdict]


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the mean of `values` (None when empty)."""
    if not values:
        return None
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), (BOOTSTRAP_RESAMPLES, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def share(part: int, whole: int) -> float | None:
    """part / whole; None (JSON's null) when there is nothing to divide, not NaN."""
    return part / whole if whole else None


def pairwise_summary(outcomes: Sequence[PairOutcome], seed: int = 0) -> dict[str, object]:
    """Win, loss and tie counts of model a against b, a's win rate (a tie counts half)
    with its interval, how often the two orders agreed, and the position bias; None for
    a rate with nothing to count."""
    decided = [o.result for o in outcomes if o.result is not None]
    score = [1.0 if r == "a" else 0.5 if r == "tie" else 0.0 for r in decided]
    verdicts = [v for o in outcomes for v in (o.a_first, o.b_first) if v in ("A", "B")]
    both = [o for o in outcomes if o.a_first is not None and o.b_first is not None]
    agreed = [o for o in both if _pick(o.a_first, "a", "b") == _pick(o.b_first, "b", "a")]
    return {
        "questions": len(outcomes),
        "unparsed": len(outcomes) - len(decided),
        "a_wins": decided.count("a"),
        "b_wins": decided.count("b"),
        "ties": decided.count("tie"),
        "a_win_rate": sum(score) / len(score) if score else None,
        "a_win_rate_ci95": bootstrap_interval(score, seed),
        "consistency": share(len(agreed), len(both)),
        # share of non-tie verdicts for whichever answer was shown first (0.5: no bias)
        "first_position_share": share(verdicts.count("A"), len(verdicts)),
    }


def single_summary(ratings: Sequence[float | None], seed: int = 0) -> dict[str, object]:
    """Mean 1-10 rating with its interval, over the parsed ratings (None when none)."""
    parsed = [r for r in ratings if r is not None]
    return {
        "questions": len(ratings),
        "unparsed": len(ratings) - len(parsed),
        "mean_rating": sum(parsed) / len(parsed) if parsed else None,
        "mean_rating_ci95": bootstrap_interval(parsed, seed),
    }
