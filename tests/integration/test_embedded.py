"""A short federated job on the embedded SmolLM2-135M model (about a minute on 2 cores)."""

import json
from pathlib import Path

import pytest

from fedit.config import load_config
from fedit.engine.simulation import Simulation

pytestmark = pytest.mark.embedded


def test_short_federation_on_embedded_model_lowers_heldout_loss(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f'output_dir="{tmp_path / "run"}"',
            'model.name_or_path="embedded"',
            'data.path="synthetic"',
            "data.synthetic_per_skill=12",
            "data.heldout_per_category=2",
            "data.max_seq_len=128",
            "partition.num_clients=5",
            "federation.rounds=2",
            "federation.clients_per_round=2",
            "train.max_steps=3",
            "train.micro_batch_size=8",
            "train.grad_accum_steps=1",
            "train.learning_rate=1e-3",
            "eval.batch_size=20",
        ],
    )
    Simulation(cfg, show_progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start, end = lines[0]["heldout"]["overall"]["loss"], lines[-1]["heldout"]["overall"]["loss"]
    assert end < 0.9 * start, (start, end)
