"""Client-level DP end to end on the tiny model: ε written every round, resumes that report
the same ε, reproducible noise that resumes bit for bit, and local noise added by the
client code every engine shares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedit.client import session
from fedit.client.releases import RELEASES_DIR, Releases
from fedit.config import RunConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.fleet.selection import select_clients
from fedit.privacy import accountant, resolve_plan
from fedit.seeding import Stream, derive_seed
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import assert_same_run

MODES = ("central", "local")


def dp_config(model_dir: Path, out: Path, mode: str, **extra: object) -> RunConfig:
    values = {
        "privacy.mode": mode,
        "privacy.noise_multiplier": 0.7,
        "privacy.clip_norm": 0.5,
        "strategy.weighting": "uniform",
        "train.max_steps": 1,
        **extra,
    }
    return load_config(None, tiny_run_overrides(model_dir, out, **values))


def epsilons(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["privacy"]["epsilon"] for line in lines if line["round"] > 0]


def run_then_resume_last_round(cfg: RunConfig) -> Path:
    """The whole run, then round 3 lost (as if the run died in it) and resumed."""
    out = Path(cfg.output_dir)
    Simulation(cfg, show_progress=False).run()
    shutil.rmtree(out / "round_0003")
    Simulation(cfg, show_progress=False).run(resume=True)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_reproducible_noise_resumes_bit_for_bit_with_epsilon_every_round(
    mode: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    extra = {"privacy.reproducible_noise": True}
    straight = dp_config(tiny_model_dir, tmp_path / "straight", mode, **extra)
    Simulation(straight, show_progress=False).run()
    resumed = run_then_resume_last_round(dp_config(tiny_model_dir, tmp_path / "b", mode, **extra))

    assert_same_run(resumed, tmp_path / "straight")
    plan = resolve_plan(straight, straight.partition.num_clients)
    assert plan is not None
    # every scheduled client was asked: the releases made are the plan's
    assert epsilons(resumed) == [plan.epsilon(plan.releases[r]) for r in (1, 2, 3)]
    if mode == "central":  # every round is a release of the federation
        assert epsilons(resumed) == sorted(epsilons(resumed))
        assert len(set(epsilons(resumed))) == 3


@pytest.mark.parametrize("mode", MODES)
def test_noise_from_the_os_differs_between_runs_and_resumes_report_the_same_epsilon(
    mode: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = dp_config(tiny_model_dir, tmp_path / "a", mode)
    Simulation(first, show_progress=False).run()
    again = run_then_resume_last_round(dp_config(tiny_model_dir, tmp_path / "b", mode))

    assert epsilons(again) == epsilons(tmp_path / "a")
    name = "round_0001/adapter_model.safetensors"
    a, b = load_file(tmp_path / "a" / name), load_file(again / name)
    assert any(not a[k].equal(b[k]) for k in a)  # the same config, other noise


def test_local_mode_clients_send_the_privatised_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = dp_config(
        tiny_model_dir, tmp_path / "run", "local", **{"privacy.reproducible_noise": True}
    )
    calls = []
    local_release = session.local_release

    def spy(update, global_state, clip_norm, std, seed):
        calls.append((update.client_id, clip_norm, std, seed))
        return local_release(update, global_state, clip_norm, std, seed)

    monkeypatch.setattr(session, "local_release", spy)
    Simulation(cfg, show_progress=False).run()

    fed = cfg.federation
    expected = [
        (k, 0.5, 0.7 * 0.5, derive_seed(cfg.seed, Stream.LOCAL_NOISE, r, k))
        for r in range(fed.rounds)
        for k in select_clients(5, fed.clients_per_round, None, cfg.seed, r)
    ]
    assert calls == expected


def test_central_mode_clients_add_no_noise(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args):
        raise AssertionError("a client privatised its update in central mode")

    monkeypatch.setattr(session, "local_release", refuse)
    cfg = dp_config(tiny_model_dir, tmp_path / "run", "central")
    Simulation(cfg, show_progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["aggregator"]["denominator"] == 2 for line in lines[1:])


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_each_round_reports_epsilon_by_the_configured_accountant(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = dp_config(tiny_model_dir, tmp_path / "run", "central", **{"privacy.accountant": method})
    Simulation(cfg, show_progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n, m = cfg.partition.num_clients, cfg.federation.clients_per_round
    delta = 1 / n**2
    assert [line["privacy"]["accountant"] for line in lines[1:]] == [method] * 3
    assert epsilons(tmp_path / "run") == [
        accountant.epsilon(0.7, r, delta, m, n, method) for r in (1, 2, 3)
    ]


def test_a_resumed_round_gets_the_releases_already_made_and_counts_them_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # local DP with noise from the OS: round 3 is lost after its clients released, and the
    # resumed run asks the same clients for round 3 again
    cfg = dp_config(tiny_model_dir, tmp_path / "run", "local")
    out = Path(cfg.output_dir)
    Simulation(cfg, show_progress=False).run()
    lost = load_file(out / "round_0003" / "adapter_model.safetensors")
    shutil.rmtree(out / "round_0003")
    Simulation(cfg, show_progress=False).run(resume=True)

    again = load_file(out / "round_0003" / "adapter_model.safetensors")
    assert all(torch.equal(lost[k], again[k]) for k in lost)  # the same releases, averaged
    ledgers = [
        Releases(out / RELEASES_DIR / f"client_{k}").released()
        for k in range(cfg.partition.num_clients)
    ]
    assert all(len(set(rounds)) == len(rounds) for rounds in ledgers)  # once per round
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["privacy"]
    plan = resolve_plan(cfg, cfg.partition.num_clients)
    assert plan is not None
    assert last["releases"] == max(len(rounds) for rounds in ledgers)
    assert last["epsilon"] == plan.epsilon(last["releases"])
