"""Per-round checkpoints: the global adapter (PEFT layout), server state, run state, config.

Layout of a run directory::

    config.toml              resolved run config
    metrics.jsonl            one line per completed round
    round_0001/              one directory per completed round
      adapter_config.json    \\ standard PEFT layout:
      adapter_model.safetensors / PeftModel.from_pretrained(base, dir) loads it
      server_state.safetensors  strategy state (momentum, moments, control variates)
      base_residual.safetensors exact LoRA aggregation: what was folded into base weights
      state.json             round counter, seed, strategy name
      config.toml            the config that produced it

A round directory is written under a temporary name and renamed when complete, so a
crash mid-write never leaves a checkpoint that looks complete, nor damages an older one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedit.config import RunConfig
from fedit.models.adapters import get_adapter_state, save_adapter, write_exact_loading_note
from fedit.types import AdapterState

ROUND_PATTERN = re.compile(r"^round_(\d{4,})$")


def round_dir(output_dir: Path, round_number: int) -> Path:
    return output_dir / f"round_{round_number:04d}"


def completed_rounds(output_dir: Path) -> list[int]:
    if not output_dir.is_dir():
        return []
    found = (ROUND_PATTERN.match(p.name) for p in output_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


@dataclass
class Checkpoint:
    round_number: int  # rounds completed
    global_state: AdapterState
    server_state: dict[str, torch.Tensor]
    base_residual: dict[str, torch.Tensor]
    run_state: dict[str, Any]


def save_checkpoint(
    output_dir: Path,
    model: PeftModel,
    checkpoint: Checkpoint,
    cfg: RunConfig,
) -> Path:
    """Write one completed round atomically and return its directory."""
    final = round_dir(output_dir, checkpoint.round_number)
    staging = output_dir / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, checkpoint.global_state, staging)
    save_file(_contiguous(checkpoint.server_state), str(staging / "server_state.safetensors"))
    if checkpoint.base_residual:
        save_file(_contiguous(checkpoint.base_residual), str(staging / "base_residual.safetensors"))
        write_exact_loading_note(staging)  # plain PEFT would ignore the residual
    (staging / "state.json").write_text(json.dumps(checkpoint.run_state, indent=2))
    cfg.save(staging / "config.toml")
    if final.exists():  # a re-run of this round after a crash between rename and metrics
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def load_global_adapter(model: PeftModel, directory: Path) -> AdapterState:
    """Read a PEFT-layout adapter into `model` and return it in fedit's naming."""
    weights = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise KeyError(f"{directory}: adapter keys not in the model: {result.unexpected_keys[:3]}")
    return get_adapter_state(model)


def load_checkpoint(model: PeftModel, directory: Path, round_number: int) -> Checkpoint:
    residual_file = directory / "base_residual.safetensors"
    return Checkpoint(
        round_number=round_number,
        global_state=load_global_adapter(model, directory),
        server_state=load_file(str(directory / "server_state.safetensors")),
        base_residual=load_file(str(residual_file)) if residual_file.exists() else {},
        run_state=json.loads((directory / "state.json").read_text()),
    )


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
