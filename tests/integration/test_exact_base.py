"""Exact LoRA aggregation refuses base weights that would round its residual away."""

from pathlib import Path

import pytest
import torch

from fedit.config import ConfigError, load_config
from fedit.engine.simulation import Simulation
from fedit.models import loading
from tests.conftest import tiny_run_overrides


def test_auto_dtype_resolving_to_half_is_refused_before_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # Prepare: model.dtype = "auto" resolves to bf16, as on a GPU
    monkeypatch.setattr(loading, "resolve_dtype", lambda name, device: torch.bfloat16)
    overrides = tiny_run_overrides(
        tiny_model_dir, tmp_path / "run", **{"strategy.lora_aggregation": "exact"}
    )
    cfg = load_config(None, overrides)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r'torch.bfloat16.*set model.dtype = "float32"'):
        Simulation(cfg, show_progress=False).run()
    assert not list((tmp_path / "run").glob("round_*"))
