"""`fedit personalize` on the tiny model: every client scored under its three adapters on
its own categories, reproducibly, its personalised adapter saved and loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedit.config import ConfigError, load_config
from fedit.engine.simulation import Simulation
from fedit.experiments.personalize import ClientScores, category_mix, personalize, report
from tests.conftest import tiny_run_overrides


def test_each_client_gets_its_own_adapter_and_three_scores(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ConfigError, match="has not finished its 3 rounds"):
        personalize(cfg, steps=2)
    Simulation(cfg, show_progress=False).run()
    scores = personalize(cfg, steps=2)
    assert [s.client for s in scores] == list(range(5))
    for s in scores:
        assert s.personalised != s.global_adapter  # the fine-tuning moved the adapter
        assert min(s.personalised, s.global_adapter, s.local_only) > 0
    assert personalize(cfg, steps=2) == scores  # seeded: the same scores again
    saved = json.loads((tmp_path / "run" / "personalized.json").read_text())
    assert [ClientScores(**row) for row in saved] == scores
    adapter = load_file(
        tmp_path / "run" / "personalized" / "client_3" / "adapter_model.safetensors"
    )
    final = load_file(tmp_path / "run" / "round_0003" / "adapter_model.safetensors")
    assert adapter.keys() == final.keys()
    # self-describing: the run's config beside it (its prompt format, for `fedit serve`)
    own = load_config(tmp_path / "run" / "personalized" / "client_3" / "config.toml")
    assert own.to_dict() == cfg.to_dict()
    text = report(scores)
    assert text.count("\n") == 2 + 5 + 2 and "| worst |" in text


def test_a_clients_own_distribution_is_its_category_mix() -> None:
    class Example:
        def __init__(self, category: str) -> None:
            self.category = category

    examples = [Example("a"), Example("a"), Example("b"), Example("a")]
    assert category_mix(examples) == {"a": 0.75, "b": 0.25}  # type: ignore[arg-type]
