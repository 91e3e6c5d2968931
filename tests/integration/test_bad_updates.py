"""Malformed updates in a real round: rejected with their reason in metrics.jsonl, and the
run bit for bit the run in which those clients sent nothing."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedit.config import load_config
from fedit.engine import simulation
from fedit.engine.simulation import Simulation
from fedit.types import Rejection
from tests.conftest import tiny_run_overrides

SMALL = {
    "partition.num_clients": 4,
    "federation.clients_per_round": 4,
    "federation.rounds": 2,
    "eval.at_start": False,
}


def corrupt_nan(update):
    key = sorted(update.state)[0]
    update.state[key] = update.state[key].clone().fill_(float("nan"))


def corrupt_shape(update):
    key = sorted(update.state)[0]
    update.state[key] = update.state[key].flatten()


def corrupt_count(update):
    update.num_examples = 10**12


def corrupt_scale(update):
    update.state = {k: t * 1e4 for k, t in update.state.items()}


CORRUPTIONS = {1: corrupt_nan, 2: corrupt_shape, 3: corrupt_count}


def patch_runner(monkeypatch, change) -> None:
    original = simulation.InProcessRunner.run_round

    def run_round(self, plan, global_state):
        replies = original(self, plan, global_state)
        change(replies)
        return replies

    monkeypatch.setattr(simulation.InProcessRunner, "run_round", run_round)


def run(tiny_model_dir: Path, out: Path, **extra) -> dict[str, torch.Tensor]:
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, out, **SMALL, **extra))
    Simulation(cfg, show_progress=False).run()
    return load_file(str(out / "round_0002" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("corruptions", "extra"),
    [(CORRUPTIONS, {}), ({2: corrupt_scale}, {"validation.max_update_norm": 5.0})],
    ids=["malformed", "norm-bound"],
)
def test_bad_updates_are_rejected_and_the_run_equals_one_without_them(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, corruptions, extra
) -> None:
    def spoil(replies):
        for update in replies.updates:
            if update.client_id in corruptions:
                corruptions[update.client_id](update)

    def leave_out(replies):
        replies.dropped += [Rejection(k, "left out") for k in corruptions]
        replies.updates = [u for u in replies.updates if u.client_id not in corruptions]

    patch_runner(monkeypatch, spoil)
    spoiled = run(tiny_model_dir, tmp_path / "spoiled", **extra)
    patch_runner(monkeypatch, leave_out)
    reference = run(tiny_model_dir, tmp_path / "reference", **extra)
    assert spoiled.keys() == reference.keys()
    assert all(torch.equal(spoiled[k], reference[k]) for k in reference)

    lines = (tmp_path / "spoiled" / "metrics.jsonl").read_text().splitlines()
    for line in map(json.loads, lines):
        reasons = {r["client"]: r["reason"] for r in line["rejected"]}
        assert sorted(reasons) == sorted(corruptions)
        assert [c["id"] for c in line["clients"]] == [k for k in range(4) if k not in corruptions]
    if corruptions is CORRUPTIONS:
        assert reasons[1].startswith("non-finite values in state")
        assert "has shape" in reasons[2]
        assert reasons[3].startswith("num_examples 1000000000000 is not an integer in [1, ")
    else:
        assert reasons[2].startswith("update norm") and "max_update_norm 5" in reasons[2]
