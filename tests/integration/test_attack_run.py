"""The attack harness in whole simulated runs on the tiny model: a sign-flipping client's
update as the server received it is x − s·Δ of the same client's honest update, and an
attack kind without malicious clients trains bit for bit the clean run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedit.config import RunConfig, load_config
from fedit.engine import rounds
from fedit.engine.simulation import Simulation
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import tensor_files

SMALL = {
    "partition.num_clients": 4,
    "federation.clients_per_round": 4,
    "federation.rounds": 2,
    "eval.at_start": False,
}


def run_config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_run_overrides(model_dir, out, **SMALL, **extra))


def received(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Per round, {client id: adapter} as the server received it, and the global x."""
    seen: list[dict] = []
    validate = rounds.validate_updates

    def spy(updates, expectations):
        seen.append(
            {
                "x": {k: t.clone() for k, t in expectations.global_state.items()},
                **{u.client_id: {k: t.clone() for k, t in u.state.items()} for u in updates},
            }
        )
        return validate(updates, expectations)

    monkeypatch.setattr(rounds, "validate_updates", spy)
    return seen


def test_a_sign_flip_client_sends_x_minus_s_delta_of_its_honest_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = received(monkeypatch)
    Simulation(run_config(tiny_model_dir, tmp_path / "clean"), show_progress=False).run()
    attacked = received(monkeypatch)
    flip = {"attack.kind": "sign_flip", "attack.clients": [2], "attack.flip_scale": 2.0}
    cfg = run_config(tiny_model_dir, tmp_path / "attack", **flip)
    Simulation(cfg, show_progress=False).run()

    first, clean = attacked[0], honest[0]  # round 1: the same x, the same seeds
    x, y = clean["x"], clean[2]
    assert all(torch.equal(first["x"][k], x[k]) for k in x)
    for key in x:
        assert torch.equal(first[2][key], x[key] - 2.0 * (y[key] - x[key]))
        assert not torch.equal(first[2][key], y[key])
        for k in (0, 1, 3):  # the honest clients send what they trained
            assert torch.equal(first[k][key], clean[k][key])
    lines = [
        json.loads(x) for x in (tmp_path / "attack" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["attack"] for line in lines] == [{"kind": "sign_flip", "clients": [2]}] * 2


@pytest.mark.parametrize("kind", ["gaussian", "backdoor"])
def test_an_attack_kind_without_malicious_clients_trains_the_clean_run(
    kind: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    Simulation(run_config(tiny_model_dir, tmp_path / "clean"), show_progress=False).run()
    cfg = run_config(tiny_model_dir, tmp_path / "reference", **{"attack.kind": kind})
    Simulation(cfg, show_progress=False).run()
    clean, reference = tensor_files(tmp_path / "clean"), tensor_files(tmp_path / "reference")
    assert clean.keys() == reference.keys() and len(clean) >= 4
    assert [name for name in clean if clean[name] != reference[name]] == []
