"""End-to-end runs of the simulation engine and CLI on the tiny model (seconds each)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.config import load_config
from fedit.engine.federation_data import centralized_steps
from fedit.engine.simulation import Simulation
from tests.conftest import tiny_run_overrides

runner = CliRunner()


def adapter(run_dir: Path, round_number: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"round_{round_number:04d}" / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_peft_adapters_and_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--quiet"]
    for override in tiny_run_overrides(tiny_model_dir, run_dir):
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for r in (1, 2, 3):
        files = {p.name for p in (run_dir / f"round_{r:04d}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "config.toml"} <= files
    lines = metrics(run_dir)
    assert [line["round"] for line in lines] == [0, 1, 2, 3]  # 0: the starting model
    assert all(len(line["clients"]) == 2 for line in lines[1:])
    heldout = lines[-1]["heldout"]
    assert heldout["overall"]["loss"] < lines[0]["heldout"]["overall"]["loss"]
    assert {"overall", "addition", "uppercase"} <= heldout.keys()
    assert lines[-1]["clients"][0]["label_tokens"] > 0
    # the same output_dir again without --resume must refuse and keep what is there
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    assert len(metrics(run_dir)) == 4


@pytest.mark.parametrize(
    "extra",
    [
        {"strategy.name": "fedavgm", "train.lr_schedule": "cosine"},
        {
            "strategy.name": "fedadam",
            "strategy.server_lr": 0.01,
            "strategy.lora_aggregation": "exact",
        },
    ],
    ids=["fedavgm-cosine", "fedadam-exact"],
)
def test_resume_after_crash_gives_identical_final_adapter(
    tiny_model_dir: Path, tmp_path: Path, extra: dict
) -> None:
    straight = load_config(None, tiny_run_overrides(tiny_model_dir, tmp_path / "a", **extra))
    Simulation(straight, show_progress=False).run()

    resumed_dir = tmp_path / "b"
    resumed = load_config(None, tiny_run_overrides(tiny_model_dir, resumed_dir, **extra))
    Simulation(resumed, show_progress=False).run()
    shutil.rmtree(resumed_dir / "round_0003")  # as if the run died during round 3
    first_pass = adapter(tmp_path / "a", 3)
    Simulation(resumed, show_progress=False).run(resume=True)

    final = adapter(resumed_dir, 3)
    assert final.keys() == first_pass.keys()
    assert all(torch.equal(final[k], first_pass[k]) for k in final)
    assert [line["round"] for line in metrics(resumed_dir)] == [0, 1, 2, 3]
    momentum = load_file(str(resumed_dir / "round_0003" / "server_state.safetensors"))
    assert momentum and all(torch.isfinite(v).all() for v in momentum.values())
    if "strategy.lora_aggregation" in extra:  # the residual folded into W0 resumes exactly
        residual_file = "round_0003/base_residual.safetensors"
        straight_residual = load_file(str(tmp_path / "a" / residual_file))
        resumed_residual = load_file(str(resumed_dir / residual_file))
        assert all(
            torch.equal(straight_residual[k], resumed_residual[k]) for k in straight_residual
        )


def test_bad_data_file_error_names_the_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = {"instruction": "a", "context": "", "response": "b", "category": "c"}
    data.write_text(json.dumps(good) + "\n" + '{"instruction": "x", "response": 3}\n')
    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "run", **{"data.path": str(data)})
    args = ["train", "--quiet"] + [a for o in overrides for a in ("--set", o)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output.replace("\n", "")


@pytest.mark.parametrize("mode", ["local", "centralized"])
def test_baselines_match_the_federated_budget(
    tiny_model_dir: Path, tmp_path: Path, mode: str
) -> None:
    cfg = load_config(
        None,
        tiny_run_overrides(
            tiny_model_dir, tmp_path / mode, **{"federation.mode": mode, "train.max_steps": 1}
        ),
    )
    Simulation(cfg, show_progress=False).run()
    lines = metrics(tmp_path / mode)[1:]
    assert all(len(line["clients"]) == 1 for line in lines)
    steps = [line["clients"][0]["steps"] for line in lines]
    # federated: 2 clients x 1 step per round; local: its own 1 step per round
    assert steps == ([2, 2, 2] if mode == "centralized" else [1, 1, 1])
    assert centralized_steps(cfg, [20] * 5) == 2
