"""A client whose training goes non-finite is left out of the round; the run goes on."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.client import session
from fedit.config import load_config
from fedit.engine.simulation import Simulation
from fedit.ops.aggregation import client_weights, weighted_mean
from tests.conftest import BadStep, tiny_run_overrides

SMALL = {
    "partition.num_clients": 3,
    "federation.clients_per_round": 3,
    "federation.rounds": 2,
    "eval.at_start": False,
}


def spoil_clients(monkeypatch, bad: set[int]) -> list:
    """Clients in `bad` get a NaN loss at their first step; returns the updates trained."""
    trained = []
    original = session.train_client

    def train_client(model, examples, cfg, *, client_id, **kwargs):
        if client_id in bad:
            kwargs["hook"] = BadStep("nan_loss", step=1)
        update = original(model, examples, cfg, client_id=client_id, **kwargs)
        trained.append(update)
        return update

    monkeypatch.setattr(session, "train_client", train_client)
    return trained


def test_a_nan_client_is_rejected_and_the_others_aggregated(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    trained = spoil_clients(monkeypatch, bad={1})
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "run", **SMALL))
    Simulation(cfg, show_progress=False).run()

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["rejected"] == [{"client": 1, "reason": "non-finite loss at local step 1"}]
        assert [c["id"] for c in line["clients"]] == [0, 2]
    first_round = trained[:2]  # client 1 raised, so it returned no update
    expected = weighted_mean(
        [u.state for u in first_round], client_weights(first_round, "examples")
    )
    got = load_file(str(tmp_path / "run" / "round_0001" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in got.values())
    assert all(torch.equal(got[k.replace(".default", "")], t) for k, t in expected.items())


def test_a_round_with_every_client_rejected_stops_the_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    spoil_clients(monkeypatch, bad={0, 1, 2})
    args = ["train", "--quiet"]
    for override in tiny_run_overrides(tiny_model_dir, tmp_path / "run", **SMALL):
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "round 1: every client was rejected (client 0: non-finite loss" in output
    assert not (tmp_path / "run" / "round_0001").exists()
