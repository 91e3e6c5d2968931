"""Client-level DP in the deployment engine (in process, as test_rounds_in_process.py): the
owners add local noise through the client code the simulation runs, the coordinator adds
central noise through the same aggregator, so with reproducible noise the deployment equals
the simulation bit for bit and reports the same ε."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedit.engine.simulation import Simulation
from tests.deploy.test_rounds_in_process import (
    LoopbackOwners,
    assert_same_adapters,
    configs,
    deploy_rounds,
    metrics,
    owners_for,
)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_private_federation_deploys_as_it_simulates(
    mode: str, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    extra = {
        "privacy.mode": mode,
        "privacy.noise_multiplier": 0.7,
        "privacy.clip_norm": 0.5,
        "privacy.reproducible_noise": True,
        "strategy.weighting": "uniform",
    }
    sim, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **extra)
    Simulation(sim, show_progress=False).run()
    run = deploy_rounds(monkeypatch, dep, LoopbackOwners(owners_for(tmp_path, files, dep), keys))
    assert run.finished == (True, "")
    assert_same_adapters(sim, dep)
    privacy = [line["privacy"] for line in metrics(dep)[1:]]
    assert privacy == [line["privacy"] for line in metrics(sim)[1:]]
    assert [p["mode"] for p in privacy] == [mode] * len(privacy)
