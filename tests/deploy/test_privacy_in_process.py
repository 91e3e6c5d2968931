"""Client-level DP in the deployment engine (in process, as test_rounds_in_process.py): the
owners add local noise through the client code the simulation runs, the coordinator adds
central noise through the same aggregator, so with reproducible noise the deployment equals
the simulation bit for bit and reports the same ε."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedit.client.releases import RELEASES_DIR, Releases
from fedit.engine.simulation import Simulation
from tests.deploy.test_rounds_in_process import (
    CoordinatorKilled,
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


class CrashAfterReplies(LoopbackOwners):
    """The owners train and reply to every round; the coordinator dies having sent round
    `crash_after`'s tasks, before it reads the replies. Each round's replies are kept."""

    def __init__(self, owners, keys, crash_after: int | None = None) -> None:
        super().__init__(owners, keys)
        self.crash_after = crash_after
        self.sent: dict[tuple[str, int], list] = {}  # (round, node): the reply's arrays

    def exchange(self, grid, messages, deadline, **kwargs):
        answers = super().exchange(grid, messages, deadline, **kwargs)
        group = messages[0].metadata.group_id if messages else ""
        for node, reply in answers.items():
            self.sent[(group, node)] = reply.content["update"].to_numpy_ndarrays()
        if group == str(self.crash_after):
            raise CoordinatorKilled
        return answers


def test_a_restarted_owner_resends_its_release_and_counts_it_once(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    extra = {
        "privacy.mode": "local",
        "privacy.noise_multiplier": 0.7,
        "privacy.clip_norm": 0.5,
        "strategy.weighting": "uniform",
    }  # noise from the OS: a re-sent release cannot be equal by a seed
    _, dep, files, keys = configs(tmp_path, tiny_model_dir, "fedavg", **extra)
    first = CrashAfterReplies(owners_for(tmp_path, files, dep), keys, crash_after=2)
    with pytest.raises(CoordinatorKilled):
        deploy_rounds(monkeypatch, dep, first)
    restarted = CrashAfterReplies(owners_for(tmp_path, files, dep), keys)  # new processes
    assert deploy_rounds(monkeypatch, dep, restarted, resume=True).finished == (True, "")

    round_two = [key for key in first.sent if key[0] == "2"]
    assert len(round_two) == 3
    for key in round_two:  # the same release, array for array
        assert all(
            np.array_equal(a, b) for a, b in zip(first.sent[key], restarted.sent[key], strict=True)
        )
    ledgers = [
        Releases(path).released()
        for path in sorted(tmp_path.glob(f"state_*/*/{RELEASES_DIR}/client_*"))
    ]
    assert [sorted(rounds) for rounds in ledgers] == [list(range(1, dep.federation.rounds + 1))] * 3
    releases = [line["privacy"]["releases"] for line in metrics(dep)[1:]]
    assert releases == list(range(1, dep.federation.rounds + 1))  # round 2 counted once
