"""Robust aggregators in a whole simulated run on the tiny model: one client sends its
update scaled ×100; median and Krum keep the global adapter near the honest clients' mean,
the plain mean does not; a round left with too few updates for Krum stops the run (a
RunStopped: the CLI prints it as one line)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedit.client import session
from fedit.config import load_config
from fedit.engine.simulation import Simulation
from fedit.ops.aggregation import client_deltas, state_norm, subtract
from fedit.server.aggregators.robust import TooFewUpdatesError
from tests.conftest import BadStep, tiny_run_overrides

ATTACKER = 4
SMALL = {
    "partition.num_clients": 5,
    "federation.clients_per_round": 5,
    "federation.rounds": 1,
    "eval.at_start": False,
    "strategy.weighting": "uniform",
}


def scale_one_client(monkeypatch) -> dict:
    """Client ATTACKER sends x + 100·(y − x); returns what each client trained, and x."""
    seen: dict = {"honest": []}
    original = session.LocalClient.train

    def train(self, model, global_state, task, train_cfg, show_progress=False):
        update = original(self, model, global_state, task, train_cfg, show_progress)
        seen["x"] = {k: t.clone() for k, t in global_state.items()}
        if self.client_id != ATTACKER:
            seen["honest"].append(update)
            return update
        scaled = {k: x + 100 * (update.state[k] - x) for k, x in global_state.items()}
        return replace(update, state=scaled)

    monkeypatch.setattr(session.LocalClient, "train", train)
    return seen


def run(tiny_model_dir: Path, run_dir: Path, aggregator: str) -> dict:
    overrides = tiny_run_overrides(
        tiny_model_dir, run_dir, **SMALL, **{"strategy.aggregator": aggregator}
    )
    Simulation(load_config(None, overrides), show_progress=False).run()
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_median_and_krum_resist_a_scaled_update_the_mean_does_not(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    distance, spread, lines = {}, {}, {}
    for aggregator in ("mean", "median", "krum"):
        seen = scale_one_client(monkeypatch)
        run_dir = tmp_path / aggregator
        lines[aggregator] = run(tiny_model_dir, run_dir, aggregator)
        x = seen["x"]
        honest = client_deltas(x, seen["honest"])
        honest_mean = {k: sum(d[k] for d in honest) / len(honest) for k in x}
        saved = load_file(str(run_dir / "round_0001" / "adapter_model.safetensors"))
        got = {k: saved[k.replace(".default", "")] for k in x}
        distance[aggregator] = state_norm(subtract(subtract(got, x), honest_mean))
        spread[aggregator] = max(state_norm(subtract(d, honest_mean)) for d in honest)
    # The mean moves 1/5 of the way along a 100x update (measured: 22x the honest spread);
    # the median stays within the honest clients' own spread around their mean (0.67x), and
    # Krum returns one honest update, which is within it by definition.
    assert distance["mean"] > 10 * spread["mean"]
    assert distance["median"] < spread["median"]
    assert distance["krum"] <= spread["krum"]
    assert ATTACKER not in lines["krum"]["aggregator"]["selected"]
    median_distances = lines["median"]["aggregator"]["distance_to_aggregate"]
    assert max(median_distances, key=median_distances.get) == str(ATTACKER)
    assert "aggregator" not in lines["mean"]


def test_a_round_left_with_too_few_updates_for_krum_stops_the_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    original = session.train_client

    def train_client(model, examples, cfg, *, client_id, **kwargs):
        if client_id == 2:  # its loss goes NaN: rejected, 4 updates are left
            kwargs["hook"] = BadStep("nan_loss", step=1)
        return original(model, examples, cfg, client_id=client_id, **kwargs)

    monkeypatch.setattr(session, "train_client", train_client)
    overrides = tiny_run_overrides(
        tiny_model_dir, tmp_path / "run", **SMALL, **{"strategy.aggregator": "krum"}
    )
    with pytest.raises(TooFewUpdatesError) as err:
        Simulation(load_config(None, overrides), show_progress=False).run()
    assert str(err.value).startswith(
        "round 1: strategy.aggregator = 'krum' needs at least 2f + 3 = 5 updates"
    )
    assert "got 4" in str(err.value)
    assert not (tmp_path / "run" / "round_0001").exists()
