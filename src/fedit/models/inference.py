"""A base model with an optional saved global adapter, ready for scoring and generation."""

from __future__ import annotations

from pathlib import Path

import torch

from fedit.config import RunConfig
from fedit.models.adapters import load_saved_adapter
from fedit.models.loading import load_model, load_tokenizer


def load_for_inference(cfg: RunConfig, adapter: Path | None):
    """(tokenizer, model): the base model, with the global adapter applied when given."""
    if adapter is not None and not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors (a round_NNNN dir?)")
    tokenizer = load_tokenizer(cfg.model)
    model: torch.nn.Module = load_model(cfg.model)
    if adapter is not None:
        model = load_saved_adapter(model, adapter)
    model.eval()
    return tokenizer, model
