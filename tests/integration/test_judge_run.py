"""`fedit judge` end to end: answers from fedit's own server on 127.0.0.1, judged both
ways round, every call saved, a stopped run continued without asking again; with a
scripted judge, wins, ties and position bias come out as the verdicts say."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from fedit.config import ConfigError
from fedit.eval.judge import parse_rating, parse_verdict
from fedit.eval.judge_run import (
    MODES,
    Endpoint,
    JudgeError,
    Question,
    read_questions,
    run_judge,
)
from tests.conftest import FEDIT

QUESTIONS = [
    {"question_id": 1, "question": "Add 2 and 3."},
    {"question_id": 2, "question": "Write 'cat' in uppercase."},
    {"question_id": 3, "question": "Name a colour."},
]


def question_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class ScriptedJudge(Endpoint):
    """Prefers model "a"'s answer whenever it sees it, calls any other pair a tie, rates
    every answer 6, and counts its calls."""

    calls = 0

    def chat(self, messages, max_tokens):
        ScriptedJudge.calls += 1
        text = messages[-1]["content"]
        if "[The Start of Assistant A's Answer]\nanswer of a" in text:
            return "A is better. [[A]]"
        if "[User Question]" in text:  # a pair without a: a tie, or B when a is B
            return "B is better. [[B]]" if "answer of a" in text else "Equal. [[C]]"
        return "Rating: [[6]]"


class ScriptedModels(Endpoint):
    def chat(self, messages, max_tokens):
        return f"answer of {self.model}"


def test_wins_ties_and_a_continued_run(tmp_path: Path) -> None:
    questions = read_questions(question_file(tmp_path))
    judge = ScriptedJudge("http://judge.invalid/v1", "scripted")
    answerer = lambda model: ScriptedModels("http://models.invalid/v1", model)  # noqa: E731
    out = tmp_path / "judged"
    summary = run_judge(questions, ["a", "b", "c"], answerer, judge, ["pairwise", "single"], out)
    a_b = summary["pairwise"]["a vs b"]
    assert (a_b["a_wins"], a_b["b_wins"], a_b["ties"]) == (3, 0, 0)
    assert a_b["consistency"] == 1.0 and a_b["first_position_share"] == 0.5
    b_c = summary["pairwise"]["b vs c"]  # the judge never picks between b and c: ties
    assert b_c["ties"] == 3 and b_c["unparsed"] == 0
    assert summary["single"]["b"]["mean_rating"] == 6.0
    assert ScriptedJudge.calls == 3 * 3 * 2 + 3 * 3  # 3 pairs × 3 questions × 2 orders + 9
    judgments = lines(out / "judgments.jsonl")
    assert {tuple(j["shown"]) for j in judgments if j["mode"] == "pairwise"} >= {
        ("a", "b"),
        ("b", "a"),
    }
    assert all(j["raw"] and j["judge"] == "scripted" for j in judgments)
    results = lines(out / "results.jsonl")
    assert [r["a vs b"] for r in results] == ["a"] * 3
    assert "| a vs b | 3 | 0 | 0 | 0 |" in (out / "summary.md").read_text()

    class Down(Endpoint):
        def chat(self, messages, max_tokens):
            raise AssertionError("asked again")

    again = run_judge(
        questions,
        ["a", "b", "c"],
        answerer,
        Down("http://judge.invalid/v1", "scripted"),
        ["pairwise", "single"],
        out,
    )
    assert json.dumps(again) == json.dumps(summary)  # all from the saved calls (null too)


def test_judging_with_fedit_s_own_server(server: str, tmp_path: Path) -> None:
    """The CLI against the tiny model served on 127.0.0.1, as answerer and judge."""
    out = tmp_path / "judged"
    command = [
        *FEDIT,
        "judge",
        str(question_file(tmp_path)),
        "--model",
        "a",
        "--model",
        "b",
        "--answers-url",
        f"{server}/v1",
        "--judge-url",
        f"{server}/v1",
        "--judge-model",
        "base",
        "--judge-key-env",
        "",
        "--max-tokens",
        "8",
        "--judge-max-tokens",
        "16",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(lines(out / "answers.jsonl")) == 2 * 3
    judgments = lines(out / "judgments.jsonl")
    assert len(judgments) == 3 * 2 + 2 * 3  # both orders of a vs b, and 2 × 3 ratings
    summary = json.loads((out / "summary.json").read_text())
    pair = summary["pairwise"]["a vs b"]
    assert (
        pair["questions"] == 3
        and pair["a_wins"] + pair["b_wins"] + pair["ties"] + pair["unparsed"] == 3
    )
    assert "A win rate (95% CI)" in done.stdout + done.stderr


def test_an_endpoint_that_fails_stops_with_what_was_saved(tmp_path: Path) -> None:
    questions = read_questions(question_file(tmp_path))
    answerer = lambda model: Endpoint("http://127.0.0.1:9/v1", model)  # noqa: E731 (nothing listens)
    with pytest.raises(JudgeError, match="127.0.0.1:9/v1 .model 'a'.*continues from it"):
        run_judge(questions, ["a"], answerer, Endpoint("x", "j"), ["single"], tmp_path / "o")


@pytest.mark.embedded
def test_judging_with_the_embedded_model_served_by_fedit(tmp_path: Path) -> None:
    """The acceptance run: fedit's own server with the embedded SmolLM2 answering (as the
    base model and with a perturbed adapter) and judging, on a handful of questions. The
    judge's quality is not the point; the plumbing, both orders and the parsing are."""
    from fedit.config import load_config
    from fedit.serve.models import ModelPool
    from tests.conftest import tiny_run_overrides
    from tests.integration.serving import random_adapter, serving

    run = random_adapter("embedded", tmp_path / "perturbed", seed=5, scale=0.02)
    cfg = load_config(None, tiny_run_overrides("embedded", tmp_path / "unused"))  # type: ignore[arg-type]
    questions = read_questions(question_file(tmp_path))
    with serving(ModelPool(cfg, [("perturbed", run / "round_0003")]), cap=256) as url:
        answerer = lambda model: Endpoint(f"{url}/v1", model)  # noqa: E731
        judge = Endpoint(f"{url}/v1", "base")
        summary = run_judge(
            questions,
            ["base", "perturbed"],
            answerer,
            judge,
            ["pairwise", "single"],
            tmp_path / "judged",
            max_tokens=24,
            judge_max_tokens=96,
        )
    judgments = lines(tmp_path / "judged" / "judgments.jsonl")
    assert len(judgments) == 3 * 2 + 2 * 3 and all(j["raw"].strip() for j in judgments)
    pair = summary["pairwise"]["base vs perturbed"]
    assert pair["a_wins"] + pair["b_wins"] + pair["ties"] + pair["unparsed"] == 3
    for j in judgments:  # whatever the judge wrote, the parse is what its text says
        expected = parse_verdict(j["raw"]) if j["mode"] == "pairwise" else parse_rating(j["raw"])
        assert j["parsed"] == expected


def strict_json(path: Path):
    """The file's JSON, refusing NaN and Infinity, which JSON does not have."""

    def refuse(constant: str):
        raise ValueError(f"{path.name}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_summary_is_valid_json_with_null_for_what_is_undefined(tmp_path: Path) -> None:
    """b vs c: the judge never picks either, so no verdict went to a shown-first answer."""
    questions = read_questions(question_file(tmp_path))
    judge = ScriptedJudge("http://judge.invalid/v1", "scripted")
    answerer = lambda model: ScriptedModels("http://models.invalid/v1", model)  # noqa: E731
    run_judge(questions, ["b", "c"], answerer, judge, ["pairwise"], tmp_path / "judged")
    summary = strict_json(tmp_path / "judged" / "summary.json")
    assert summary["pairwise"]["b vs c"]["first_position_share"] is None
    assert (
        "| b vs c | 0 | 0 | 3 | 0 | 0.50 (0.50–0.50) | 1.00 | – |"
        in (tmp_path / "judged" / "summary.md").read_text()
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"judge": ScriptedJudge("http://judge.invalid/v1", "another")}, "judge model: 'scripted'"),
        ({"judge": ScriptedJudge("http://other.invalid/v1", "scripted")}, "judge URL: 'http://j"),
        ({"answers_url": "http://elsewhere.invalid/v1"}, "answers URL of model 'a': 'http://m"),
        ({"max_tokens": 16}, "answers' max tokens: 512 before, 16 now"),
        ({"judge_max_tokens": 16}, "judge's max tokens: 1024 before, 16 now"),
        ({"question": "Add 2 and 4."}, "question '1': 'Add 2 and 3.' before, 'Add 2 and 4.' now"),
    ],
)
def test_a_run_with_other_settings_is_refused_and_nothing_is_lost(
    tmp_path: Path, change: dict, message: str
) -> None:
    questions = read_questions(question_file(tmp_path))
    judge = ScriptedJudge("http://judge.invalid/v1", "scripted")
    out = tmp_path / "judged"

    def answerer(url: str):
        return lambda model: ScriptedModels(url, model)

    run_judge(questions, ["a", "b"], answerer("http://models.invalid/v1"), judge, MODES, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if "question" in change:
        questions = [Question("1", change["question"]), *questions[1:]]
    with pytest.raises(
        ConfigError, match=re.escape(message) + ".*another directory .--out., or delete"
    ):
        run_judge(
            questions,
            ["a", "b"],
            answerer(change.get("answers_url", "http://models.invalid/v1")),
            change.get("judge", judge),
            MODES,
            out,
            max_tokens=change.get("max_tokens", 512),
            judge_max_tokens=change.get("judge_max_tokens", 1024),
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_continued_run_may_add_models_and_questions(tmp_path: Path) -> None:
    questions = read_questions(question_file(tmp_path))
    judge = ScriptedJudge("http://judge.invalid/v1", "scripted")
    answerer = lambda model: ScriptedModels("http://models.invalid/v1", model)  # noqa: E731
    out = tmp_path / "judged"
    run_judge(questions[:2], ["a", "b"], answerer, judge, ["single"], out)
    summary = run_judge(questions, ["a", "b", "c"], answerer, judge, ["single"], out)
    assert summary["single"]["c"]["questions"] == 3
    assert len(lines(out / "answers.jsonl")) == 3 * 3
    (out / "settings.json").unlink()  # e.g. an --out an older fedit wrote
    with pytest.raises(ConfigError, match="no settings.json, so what they were asked with"):
        run_judge(questions, ["a"], answerer, judge, ["single"], out)


def test_the_cli_refuses_another_judge_in_one_line(server: str, tmp_path: Path) -> None:
    """`fedit judge` again into its --out with another judge model: exit 2, the
    difference named in one line, and what the first run saved kept as it was."""
    out = tmp_path / "judged"

    def judge_with(judge_model: str) -> subprocess.CompletedProcess:
        command = [
            *FEDIT,
            "judge",
            str(question_file(tmp_path)),
            *("--model", "a", "--mode", "single", "--judge-key-env", ""),
            *("--answers-url", f"{server}/v1", "--judge-url", f"{server}/v1"),
            *("--judge-model", judge_model, "--max-tokens", "4", "--judge-max-tokens", "4"),
            *("--out", str(out)),
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert judge_with("base").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = judge_with("b")
    assert done.returncode == 2, done.stderr + done.stdout
    assert "judge model: 'base' before, 'b' now" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
