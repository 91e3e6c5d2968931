"""`fedit report` on a tiny run and a comparison directory: the report's sections and
charts, who took part in each round, and a bad metrics file named by line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure

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


def drawn_charts(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """The figures the report saves, by file stem, as they are saved."""
    drawn: dict[str, Figure] = {}
    save = Figure.savefig

    def keep(fig: Figure, path, *args, **kwargs) -> None:
        drawn[Path(path).stem] = fig
        save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return drawn


def test_a_single_scored_round_shows_on_the_held_out_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out loss scored after the last round only: one point per category, which a
    line without markers does not draw."""
    client = {"id": 0, "train_loss": 2.0, "bytes_down": 10, "bytes_up": 10}
    rows = [{"round": r, "clients": [client]} for r in (1, 2)]
    rows.append({"round": 3, "clients": [client], "heldout": {"overall": {"loss": 1.5}}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = drawn_charts(monkeypatch)
    write_report(tmp_path)
    lines = drawn["heldout_loss"].axes[0].get_lines()
    assert lines and all(line.get_marker() not in (None, "None", "", " ") for line in lines)


@pytest.mark.parametrize(
    "name, federation",
    [("local-1", {"mode": "local", "local_client": 1}), ("centralized", {"mode": "centralized"})],
)
def test_a_baseline_is_named_as_itself_and_sends_nothing(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    federation: dict,
) -> None:
    out = tmp_path / name
    overrides = {f"federation.{k}": v for k, v in federation.items()}
    Simulation(load_config(None, tiny_run_overrides(tiny_model_dir, out, **overrides)), False).run()
    drawn = drawn_charts(monkeypatch)
    text = write_report(out).read_text()
    legend = drawn["train_loss"].axes[0].get_legend().get_texts()
    assert [t.get_text() for t in legend] == [name]
    assert "client 0" not in text and "MB in all" not in text
    assert "nothing is sent" in text and "## Participation" not in text
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("bytes_up" in c for line in metrics for c in line.get("clients", []))
