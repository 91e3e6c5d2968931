"""Exact-aggregation round directories: fedit's loader and `fedit export` give the trained
model; plain PeftModel.from_pretrained does not (it ignores base_residual.safetensors)."""

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.config import load_config
from fedit.models.adapters import load_saved_adapter
from fedit.models.loading import load_model
from tests.conftest import tiny_run_overrides

runner = CliRunner()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=torch.tensor([[5, 40, 41, 42, 2, 17, 99]])).logits


def test_exact_rounds_load_with_fedit_or_export_not_plain_peft(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    overrides = tiny_run_overrides(
        tiny_model_dir,
        tmp_path / "run",
        **{"strategy.lora_aggregation": "exact", "federation.rounds": 2, "lora.dropout": 0.0},
    )
    result = runner.invoke(app, ["train", "--quiet", *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    round_dir = tmp_path / "run" / "round_0002"
    note = (round_dir / "LOADING.txt").read_text()
    assert "load_saved_adapter" in note and "fedit export" in note

    merged = tmp_path / "merged"
    result = runner.invoke(app, ["export", "--adapter", str(round_dir), "--out", str(merged)])
    assert result.exit_code == 0, result.output

    cfg = load_config(round_dir / "config.toml").model
    expected = logits(load_saved_adapter(load_model(cfg), round_dir))
    exported = logits(AutoModelForCausalLM.from_pretrained(merged))
    plain = logits(PeftModel.from_pretrained(load_model(cfg), str(round_dir)))
    assert (exported - expected).abs().max() < 1e-5
    assert (plain - expected).abs().max() > 1e-4
