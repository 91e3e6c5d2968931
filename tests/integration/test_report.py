"""`fedit report` on a tiny run and a comparison directory: the report's sections and
charts, who took part in each round, and a bad metrics file named by line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedit.config import load_config
from fedit.data.records import DataFormatError
from fedit.engine.simulation import Simulation
from fedit.eval.run_report import participation, write_report
from tests.conftest import tiny_run_overrides


def test_a_run_and_a_comparison_get_their_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare" / "fedit"
    Simulation(load_config(None, tiny_run_overrides(tiny_model_dir, out)), False).run()
    text = write_report(out).read_text()
    for section in ("Held-out loss per category", "Clients' train loss", "Participation"):
        assert f"## {section}" in text
    assert "| overall |" in text and "MB in all" in text
    for chart in ("heldout_loss", "train_loss", "participation", "bytes"):
        assert (out / "report" / f"{chart}.png").stat().st_size > 1000
    (tmp_path / "compare" / "scores.md").write_text("### exact match\n\n| model | mean |\n")
    shutil.copytree(out, tmp_path / "compare" / "local-0")
    summary = write_report(tmp_path / "compare").read_text()
    assert "| model | mean |" in summary and "- [local-0](local-0/report.md)" in summary
    assert (tmp_path / "compare" / "report" / "heldout_loss.png").is_file()


def test_participation_marks_trained_rejected_and_dropped() -> None:
    rounds = [
        {"round": 0, "heldout": {}},
        {"round": 1, "clients": [{"id": 0}], "dropped": [{"client": 3, "reason": "offline"}]},
        {"round": 2, "clients": [{"id": 3}], "rejected": [{"client": 1, "reason": "nan"}]},
    ]
    assert participation(rounds) == ([1, 2], [0, 1, 3], [[2, 0, -1], [0, 1, 2]])


def test_a_bad_metrics_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=r"metrics.jsonl:2: not a round's metrics line"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        write_report(tmp_path / "nothing")
