"""`fedit judge`: MT-Bench-style LLM-as-judge of models served over OpenAI's API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import console, friendly_errors


@friendly_errors
def judge(
    questions: Annotated[Path, typer.Argument(help="JSONL: question_id and question (or turns)")],
    models: Annotated[
        list[str], typer.Option("--model", help="A model to judge (repeatable; 2+ for pairwise)")
    ],
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name")],
    answers_url: Annotated[
        str, typer.Option("--answers-url", help="OpenAI-compatible URL that answers as --model")
    ] = "http://127.0.0.1:8000/v1",
    judge_url: Annotated[
        str, typer.Option("--judge-url", help="OpenAI-compatible URL of the judge")
    ] = "https://api.openai.com/v1",
    judge_key_env: Annotated[
        str, typer.Option("--judge-key-env", help="Environment variable with the judge's key")
    ] = "OPENAI_API_KEY",
    mode: Annotated[
        list[str] | None, typer.Option("--mode", help="pairwise and/or single (default both)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Results directory")] = Path("runs/judge"),
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 512,
    judge_max_tokens: Annotated[int, typer.Option("--judge-max-tokens", min=1)] = 1024,
) -> None:
    """Judge models' answers with an LLM: pairwise (both orders) and 1-10 grading."""
    from fedit.eval.judge_run import MODES, Endpoint, api_key, read_questions, run_judge

    modes = mode or list(MODES)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise typer.BadParameter(f"--mode: {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if "pairwise" in modes and len(models) < 2:
        raise typer.BadParameter("--mode pairwise compares two or more --model")
    if len(set(models)) != len(models):
        raise typer.BadParameter("--model: each model once")
    asked = read_questions(questions)
    referee = Endpoint(judge_url, judge_model, api_key(judge_key_env))
    run_judge(
        asked,
        models,
        lambda model: Endpoint(answers_url, model),
        referee,
        modes,
        out,
        max_tokens,
        judge_max_tokens,
    )
    console.print((out / "summary.md").read_text(), markup=False)
    console.print(f"answers, raw judgments and results in {out}/", markup=False)
