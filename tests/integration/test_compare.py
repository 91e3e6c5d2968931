"""The Base / Local / FedIT / Centralised comparison, end to end on the tiny model."""

import json
from pathlib import Path

import pytest

from fedit.config import ConfigError, load_config
from fedit.data.prepare import load_heldout
from fedit.data.synthetic import SKILL_NAMES
from fedit.experiments.compare import Contender, final_heldout_loss, run_comparison, score_model
from tests.conftest import tiny_run_overrides


def test_comparison_writes_tables_charts_and_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_run_overrides(
        tiny_model_dir,
        tmp_path / "cmp",
        **{
            "federation.rounds": 2,
            "train.max_steps": 1,
            "eval.max_new_tokens": 4,
            "eval.at_start": False,
            "data.preference_path": "synthetic",
        },
    )
    cfg = load_config(None, overrides)
    contenders = ["base", "local:0", "local:addition+uppercase", "fedit", "centralized"]
    results = run_comparison(cfg, contenders, tmp_path / "cmp")

    names = ["base", "local-0", "local-addition_uppercase", "fedit", "centralized"]
    assert list(results) == names
    for scores in results.values():
        assert set(scores["exact_match"]) == {*SKILL_NAMES, "mean"}
        assert 0.0 <= scores["exact_match"]["mean"] <= 1.0
        assert set(scores["loss"]) == {*SKILL_NAMES, "mean"}
    assert results["base"]["preference_accuracy"]["mean"] == 0.0  # no adapter: rewards are 0
    table = (tmp_path / "cmp" / "scores.md").read_text()
    assert "| local-addition_uppercase |" in table and "preference accuracy" in table
    for chart in ("exact_match.png", "loss.png", "preference_accuracy.png"):
        assert (tmp_path / "cmp" / chart).stat().st_size > 0
    lines = (tmp_path / "cmp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["model"] for line in lines] == names
    # trained contenders left their own runs; a second comparison only re-scores them
    assert (tmp_path / "cmp" / "fedit" / "round_0002" / "adapter_model.safetensors").is_file()
    again = run_comparison(cfg, ["fedit"], tmp_path / "cmp")
    assert again["fedit"]["loss"] == results["fedit"]["loss"]
    # the loss reused from the run's last round is the one scoring would compute itself
    fedit_cfg = Contender("fedit").config(cfg, tmp_path / "cmp")
    fresh, _ = score_model(fedit_cfg, tmp_path / "cmp" / "fedit" / "round_0002", load_heldout(cfg))
    assert final_heldout_loss(fedit_cfg) is not None
    assert fresh["loss"] == pytest.approx(results["fedit"]["loss"], rel=1e-5)
    assert fresh["exact_match"] == results["fedit"]["exact_match"]


@pytest.mark.parametrize("spec", ["fedavg", "local", "fedit:x", "centralized:3"])
def test_bad_contender_names_the_spec(tiny_config, spec: str) -> None:
    with pytest.raises(ConfigError, match="contender"):
        Contender(spec).config(tiny_config, Path("out"))


def test_the_llm_judge_is_one_more_scorer(
    server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """eval.judge_model on: the contenders' own answers judged by an endpoint (here fedit's
    server on 127.0.0.1), pairwise against eval.judge_against and graded."""
    overrides = tiny_run_overrides(
        tiny_model_dir,
        tmp_path / "cmp",
        **{
            "federation.rounds": 1,
            "train.max_steps": 1,
            "eval.max_new_tokens": 4,
            "eval.at_start": False,
            "eval.judge_model": "base",
            "eval.judge_url": f"{server}/v1",
            "eval.judge_key_env": "",
            "eval.judge_questions": 3,
            "eval.judge_max_tokens": 16,
        },
    )
    cfg = load_config(None, overrides)
    run_comparison(cfg, ["base", "local:0", "fedit"], tmp_path / "cmp")
    table = (tmp_path / "cmp" / "scores.md").read_text()
    assert "### LLM judge" in table
    assert "| fedit vs base |" in table and "| fedit vs local-0 |" in table
    summary = json.loads((tmp_path / "cmp" / "judge" / "summary.json").read_text())
    assert set(summary["single"]) == {"base", "local-0", "fedit"}
    answers = [json.loads(x) for x in (tmp_path / "cmp" / "judge" / "answers.jsonl").open()]
    assert len(answers) == 3 * 3  # the contenders' own answers, not asked again
    bad = load_config(None, [*overrides, 'eval.judge_against="centralized"'])
    with pytest.raises(ConfigError, match="eval.judge_against: 'centralized' is not a contender"):
        run_comparison(bad, ["base", "fedit"], tmp_path / "cmp")
