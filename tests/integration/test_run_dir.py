"""The run directory: what --resume accepts, what a failed command leaves, checkpoint errors."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.config import ConfigError, load_config
from fedit.engine import checkpoint
from fedit.engine.simulation import Simulation
from fedit.models.adapters import attach_lora, get_adapter_state
from fedit.models.loading import load_model
from fedit.models.tiny import make_tiny_model
from tests.conftest import tiny_run_overrides
from tests.integration.test_crash_resume import STRATEGIES, assert_same_run

runner = CliRunner()


def train(model_dir: Path, run_dir: Path, *extra_args: str, **values: object):
    args = ["train", "--quiet", *extra_args]
    for override in tiny_run_overrides(model_dir, run_dir, **{"train.max_steps": 1, **values}):
        args += ["--set", override]
    return runner.invoke(app, args)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture
def finished(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A finished 2-round run."""
    result = train(tiny_model_dir, tmp_path / "run", **{"federation.rounds": 2})
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def output(result) -> str:
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (
            {"train.learning_rate": 0.01, "seed": 99},
            ["seed (42 -> 99)", "train.learning_rate (0.005 -> 0.01)"],
        ),
        ({"strategy.name": "fedavgm"}, ["strategy.name ('fedavg' -> 'fedavgm')"]),
        ({"strategy.weighting": "uniform"}, ["strategy.weighting"]),
        ({"lora.r": 8}, ["lora.r (4 -> 8)"]),
        ({"lora.target_modules": ["q_proj"]}, ["lora.target_modules"]),
    ],
    ids=["seed-lr", "strategy", "strategy-hyperparameter", "lora-r", "lora-targets"],
)
def test_resume_refuses_changed_keys_and_keeps_the_run(
    tiny_model_dir: Path, finished: Path, changes: dict, named: list[str]
) -> None:
    before = snapshot(finished)
    result = train(tiny_model_dir, finished, "--resume", **{"federation.rounds": 3, **changes})
    assert result.exit_code == 2
    assert f"cannot resume {finished}" in output(result)
    assert all(name in output(result) for name in named), output(result)
    assert snapshot(finished) == before


def test_resume_with_broken_data_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path, finished: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "response": 3}\n')
    before = snapshot(finished)
    result = train(
        tiny_model_dir, finished, "--resume", **{"data.path": str(broken), "federation.rounds": 3}
    )
    assert result.exit_code == 2
    assert "data.path" in output(result)
    assert snapshot(finished) == before


def test_resume_whose_data_file_changed_is_refused_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # the same data.path (so the configs agree), but other records in the file
    data = tmp_path / "data.jsonl"
    rows = [
        {"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": f"c{i % 2}"}
        for i in range(24)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    values = {"data.path": str(data), "federation.rounds": 2}
    assert train(tiny_model_dir, tmp_path / "run", **values).exit_code == 0
    before = snapshot(tmp_path / "run")
    data.write_text(data.read_text().replace('"a3"', '"a three"'))
    result = train(
        tiny_model_dir, tmp_path / "run", "--resume", **{**values, "federation.rounds": 3}
    )
    assert result.exit_code == 2
    assert f"data.path: {data} changed since the run started" in output(result)
    assert snapshot(tmp_path / "run") == before


def test_resume_on_changed_base_weights_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "model")
    assert train(model_dir, tmp_path / "run", **{"federation.rounds": 2}).exit_code == 0
    before = snapshot(tmp_path / "run")
    make_tiny_model(model_dir, seed=1)  # the same path and shapes, other weights
    result = train(model_dir, tmp_path / "run", "--resume", **{"federation.rounds": 3})
    assert result.exit_code == 2
    changed = model_dir / "model.safetensors"
    assert f"model.name_or_path: {changed} changed since the run started" in output(result)
    assert snapshot(tmp_path / "run") == before


def test_failed_fresh_run_leaves_no_output_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "response": 3}\n')
    result = train(tiny_model_dir, tmp_path / "run", **{"data.path": str(broken)})
    assert result.exit_code == 2
    assert not (tmp_path / "run").exists()
    missing_model = {"model.name_or_path": str(tmp_path / "no-model")}
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "run", **missing_model))
    with pytest.raises(ConfigError, match="model.name_or_path"):
        Simulation(cfg, show_progress=False).run()
    assert not (tmp_path / "run").exists()


def test_resume_with_more_rounds_and_other_eval_settings_is_exact(
    tiny_model_dir: Path, tmp_path: Path, finished: Path
) -> None:
    more = {"federation.rounds": 3, "eval.batch_size": 3, "train.threads": 1}
    result = train(tiny_model_dir, finished, "--resume", **more)
    assert result.exit_code == 0, result.output
    assert load_config(finished / "config.toml").federation.rounds == 3
    straight = train(tiny_model_dir, tmp_path / "straight", **{"federation.rounds": 3})
    assert straight.exit_code == 0
    adapter = "round_0003/adapter_model.safetensors"
    assert (finished / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()


def test_resume_refuses_more_rounds_of_a_cosine_schedule(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cosine = {"train.lr_schedule": "cosine", "federation.rounds": 2}
    assert train(tiny_model_dir, tmp_path / "run", **cosine).exit_code == 0
    result = train(
        tiny_model_dir, tmp_path / "run", "--resume", **{**cosine, "federation.rounds": 3}
    )
    assert result.exit_code == 2
    assert "federation.rounds (2 -> 3" in output(result) and "cosine" in output(result)


def test_resume_of_a_finished_run(tiny_model_dir: Path, finished: Path) -> None:
    before = snapshot(finished)
    same = train(tiny_model_dir, finished, "--resume", **{"federation.rounds": 2})
    assert same.exit_code == 0, same.output
    assert "already completed 2 rounds" in output(same)
    assert snapshot(finished) == before
    fewer = train(tiny_model_dir, finished, "--resume", **{"federation.rounds": 1})
    assert fewer.exit_code == 2
    assert f"{finished} already completed 2 rounds; federation.rounds = 1 is fewer" in output(fewer)
    assert snapshot(finished) == before


def test_resume_checks_the_checkpoint_strategy(tiny_model_dir: Path, tmp_path: Path) -> None:
    # FedAvgM's state ("v.*") loads into FedAdam's v too: state.json must be checked
    values = {"strategy.name": "fedadam", "strategy.server_lr": 0.01, "federation.rounds": 2}
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "run", **values))
    Simulation(cfg, show_progress=False).run()
    state_file = tmp_path / "run" / "round_0002" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "strategy": "fedavgm"}))
    resumed = load_config(
        None,
        tiny_run_overrides(tiny_model_dir, tmp_path / "run", **{**values, "federation.rounds": 3}),
    )
    with pytest.raises(ConfigError, match="state.json.*fedavgm"):
        Simulation(resumed, show_progress=False).run(resume=True)


def test_fresh_run_ignores_stale_client_state(tiny_model_dir: Path, tmp_path: Path) -> None:
    # SCAFFOLD with 70 clients keeps c_k on disk: a directory holding an older run's
    # client_state (and no rounds) must not leak it into a fresh run
    values = {**STRATEGIES["scaffold70"], "train.max_steps": 1}
    straight = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "a", **values))
    Simulation(straight, show_progress=False).run()
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "b", **values))
    like = get_adapter_state(attach_lora(load_model(cfg.model), cfg.lora, cfg.seed))
    stale = tmp_path / "b" / "client_state"
    stale.mkdir(parents=True)
    for k in range(70):
        save_file(
            {name: torch.ones_like(t) for name, t in like.items()}, stale / f"c_{k}.safetensors"
        )
    Simulation(cfg, show_progress=False).run()
    assert_same_run(tmp_path / "b", tmp_path / "a")


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    ],
    ids=["oserror", "safetensors"],
)
@pytest.mark.parametrize("strategy", ["fedadam", "scaffold70"])
def test_disk_full_mid_checkpoint_fails_cleanly_and_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, error
) -> None:
    values = {**STRATEGIES[strategy], "train.max_steps": 1}
    straight = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "a", **values))
    Simulation(straight, show_progress=False).run()
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "b", **values))
    save = checkpoint.save_file

    def full(tensors, filename, *args, **kwargs):
        if "round_0002" in str(filename):
            raise error
        return save(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "save_file", full)
        with pytest.raises(OSError, match="round_0002") as raised:
            Simulation(cfg, show_progress=False).run()
    assert "No space left on device" in str(raised.value)
    run_dir = tmp_path / "b"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("round", ".tmp"))) == [
        "round_0001"
    ]
    Simulation(cfg, show_progress=False).run(resume=True)
    assert_same_run(run_dir, tmp_path / "a")
