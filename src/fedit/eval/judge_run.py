"""`fedit judge`: answers from OpenAI-compatible endpoints (e.g. `fedit serve`), judged by
another (a hosted model, or fedit's own server), every call saved as it returns.

The out directory holds answers.jsonl (each model's answer to each question),
judgments.jsonl (each judge call: its prompt's kind and order, the judge's raw output and
the parsed verdict or rating), results.jsonl (per question: each pair's result, each
model's rating), summary.json / summary.md (null, or "–", for a rate with nothing to
count) and settings.json (what the saved calls were asked with). A run that stops (a
network error, a rate limit) keeps what it has, and the same command continues from it:
answers and judgments already saved are not asked for again. Continuing may add models
and questions, but a run with another judge, endpoint, token limit or question text
would mix old calls with new ones under the new judge's name, so it is refused.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedit.config import ConfigError
from fedit.data.readers import jsonl_rows
from fedit.data.records import DataFormatError
from fedit.errors import RunStopped
from fedit.eval.judge import (
    PairOutcome,
    pair_messages,
    pairwise_summary,
    parse_rating,
    parse_verdict,
    single_messages,
    single_summary,
)
from fedit.textfile import read_utf8

MODES = ("pairwise", "single")


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    category: str = ""


def read_questions(path: Path) -> list[Question]:
    """A JSONL file of {"question_id" or "id", "question"} or MT-Bench's {"question_id",
    "turns": [...], "category"} (its first turn: fedit judges single-turn answers)."""
    questions, seen = [], set()
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataFormatError(f"{where}: expected an object")
        qid = row.get("question_id", row.get("id"))
        text = row.get("question")
        if text is None and isinstance(row.get("turns"), list) and row["turns"]:
            text = row["turns"][0]
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise DataFormatError(f'{where}: needs a "question_id" (or "id"), a string or int')
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f'{where}: needs a non-empty "question" (or "turns")')
        if str(qid) in seen:
            raise DataFormatError(f"{where}: question_id {qid!r} again")
        seen.add(str(qid))
        questions.append(Question(str(qid), text, str(row.get("category", ""))))
    if not questions:
        raise DataFormatError(f"{path}: no questions")
    return questions


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint: its base URL (…/v1), a model name, an API key."""

    url: str
    model: str
    api_key: str = "unused"

    @functools.cached_property
    def client(self):
        """One client (and connection pool) for all of this endpoint's calls."""
        import openai

        return openai.OpenAI(base_url=self.url, api_key=self.api_key, max_retries=2)

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """The greedy reply (temperature 0, as MT-Bench judges)."""
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=max_tokens
            )
        except openai.OpenAIError as err:
            raise JudgeError(
                f"{self.url} (model {self.model!r}): {err}; what was saved is kept, and the "
                "same command continues from it"
            ) from None
        return reply.choices[0].message.content or ""


class JudgeError(RunStopped):
    """An endpoint failed; what was saved before is kept, and the command continues it."""


def api_key(variable: str) -> str:
    """The key in environment variable `variable` ("unused" when it is unset or empty: a
    local server such as `fedit serve` takes any)."""
    return (os.environ.get(variable) if variable else None) or "unused"


class SavedCalls:
    """A JSONL file of calls keyed by `key` fields: read back on start, appended (and
    flushed to disk) as each call returns."""

    def __init__(self, path: Path, key: Sequence[str]) -> None:
        self.path, self.key = path, tuple(key)
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            for number, line in enumerate(read_utf8(path).splitlines(), start=1):
                try:
                    row = json.loads(line)
                    self.rows[self._ident(row)] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataFormatError(
                        f"{path}:{number}: not a saved call (delete the line to ask again)"
                    ) from None

    def get(self, make: Callable[[], dict[str, Any]], **key: Any) -> dict[str, Any]:
        """The saved row of `key`, or `make()`'s new one, saved first."""
        ident = self._ident(key)
        if ident not in self.rows:
            row = {**key, **make()}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.rows[ident] = row
        return self.rows[ident]

    def _ident(self, row: dict[str, Any]) -> str:
        return json.dumps([row[k] for k in self.key])


class Chat(Protocol):
    """What answers or judges: an Endpoint, or answers given beforehand."""

    model: str
    url: str  # where its replies come from, recorded in settings.json

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str: ...


def run_judge(
    questions: list[Question],
    models: list[str],
    answerer: Callable[[str], Chat],
    judge: Chat,
    modes: Sequence[str],
    out: Path,
    max_tokens: int = 512,
    judge_max_tokens: int = 1024,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Answer, judge and summarise (the module docstring); `answerer(model)` is what
    answers as `model`; `pairs` the (a, b) compared pairwise (default: every pair)."""
    answerers = {m: answerer(m) for m in models}  # one each: its client is reused
    settings = {
        "judge_model": judge.model,
        "judge_url": judge.url,
        "judge_max_tokens": judge_max_tokens,
        "max_tokens": max_tokens,
        "answers_url": {m: a.url for m, a in answerers.items()},
        "questions": {q.id: q.text for q in questions},
    }
    check_settings(out, settings)  # before anything is written or asked
    answers = SavedCalls(out / "answers.jsonl", ("model", "question_id"))
    judged = SavedCalls(out / "judgments.jsonl", ("mode", "question_id", "shown"))
    answer = {
        (m, q.id): answers.get(
            lambda m=m, q=q: {"answer": answerers[m].chat(user(q.text), max_tokens)},
            model=m,
            question_id=q.id,
        )["answer"]
        for m in models
        for q in questions
    }

    def verdict(kind: str, q: Question, shown: list[str], messages) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            raw = judge.chat(messages, judge_max_tokens)
            parsed = parse_verdict(raw) if kind == "pairwise" else parse_rating(raw)
            return {"judge": judge.model, "raw": raw, "parsed": parsed}

        return judged.get(ask, mode=kind, question_id=q.id, shown=shown)

    results = {q.id: {"question_id": q.id, "category": q.category} for q in questions}
    summary: dict[str, Any] = {"judge": judge.model, "questions": len(questions)}
    if "pairwise" in modes:
        summary["pairwise"] = {}
        for a, b in pairs if pairs is not None else itertools.combinations(models, 2):
            outcomes = []
            for q in questions:
                first = pair_messages(q.text, answer[(a, q.id)], answer[(b, q.id)])
                second = pair_messages(q.text, answer[(b, q.id)], answer[(a, q.id)])
                outcome = PairOutcome(
                    verdict("pairwise", q, [a, b], first)["parsed"],
                    verdict("pairwise", q, [b, a], second)["parsed"],
                )
                results[q.id][f"{a} vs {b}"] = outcome.result
                outcomes.append(outcome)
            summary["pairwise"][f"{a} vs {b}"] = pairwise_summary(outcomes)
    if "single" in modes:
        summary["single"] = {}
        for m in models:
            ratings = []
            for q in questions:
                rating = verdict("single", q, [m], single_messages(q.text, answer[(m, q.id)]))
                results[q.id][f"rating {m}"] = rating["parsed"]
                ratings.append(rating["parsed"])
            summary["single"][m] = single_summary(ratings)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results.values()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    (out / "summary.md").write_text(summary_table(summary))
    return summary


SETTINGS = "settings.json"
SETTING_NAMES = {
    "judge_model": "judge model",
    "judge_url": "judge URL",
    "judge_max_tokens": "judge's max tokens",
    "max_tokens": "answers' max tokens",
    "answers_url": "answers URL of model {}",
    "questions": "question {}",
}


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an `out` whose saved calls were asked with other settings (ConfigError
    naming the first that differs, with both values); else record `settings` there,
    merged with the saved ones (a continued run may add models and questions)."""
    path = out / SETTINGS
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = json.loads(read_utf8(path))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(saved, dict):
            raise DataFormatError(f"{path}: expected an object of settings")
    elif any((out / name).exists() for name in ("answers.jsonl", "judgments.jsonl")):
        raise ConfigError(
            f"{out}: holds saved calls but no {SETTINGS}, so what they were asked with is "
            "unknown; judge into another directory (--out)"
        )
    changed = first_change(saved, settings)
    if changed is not None:
        name, before, now = changed
        raise ConfigError(
            f"{out}: its saved answers and verdicts were asked with {name}: {before!r} "
            f"before, {now!r} now; judge into another directory (--out), or delete this one to "
            "start over"
        )
    merged = {
        k: {**saved.get(k, {}), **v} if isinstance(v, dict) else v for k, v in settings.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))


def first_change(saved: dict[str, Any], settings: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting whose saved value differs: (its name, saved value, new value)."""
    for key, name in SETTING_NAMES.items():
        old, new = saved.get(key), settings[key]
        if isinstance(new, dict):  # per model or question: those saved before must match
            for which, value in new.items():
                if isinstance(old, dict) and which in old and old[which] != value:
                    return name.format(repr(which)), old[which], value
        elif key in saved and old != new:
            return name, old, new
    return None


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: each pair's wins, ties and win rate; each model's mean rating."""
    lines = [f"Judge: {summary['judge']}, {summary['questions']} questions.\n"]
    if summary.get("pairwise"):
        lines += [
            "| A vs B | A wins | B wins | ties | unparsed | A win rate (95% CI) | "
            "orders agree | first-shown share |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for pair, s in summary["pairwise"].items():
            lines.append(
                f"| {pair} | {s['a_wins']} | {s['b_wins']} | {s['ties']} | {s['unparsed']} | "
                f"{_with_interval(s['a_win_rate'], s['a_win_rate_ci95'])} | "
                f"{_number(s['consistency'])} | {_number(s['first_position_share'])} |"
            )
        lines.append("")
    if summary.get("single"):
        lines += ["| model | mean rating (95% CI) | unparsed |", "|---|---|---:|"]
        for model, s in summary["single"].items():
            rating = _with_interval(s["mean_rating"], s["mean_rating_ci95"])
            lines.append(f"| {model} | {rating} | {s['unparsed']} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None or interval is None:
        return "–"
    return f"{value:.2f} ({interval[0]:.2f}–{interval[1]:.2f})"
