"""A base model with an optional saved global adapter, ready for scoring and generation.

torch, transformers and PEFT are imported inside ``load_for_inference``, so that the CLI
can check an --adapter directory (``check_adapter_dir``) before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path

from fedit.config import RunConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_dir(adapter: Path) -> None:
    """A FileNotFoundError naming the problem unless `adapter` is a saved round directory."""
    if not adapter.exists():
        raise FileNotFoundError(f"adapter not found: {adapter}")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter}: no {ADAPTER_WEIGHTS} (a round_NNNN directory?)")


def load_for_inference(cfg: RunConfig, adapter: Path | None):
    """(tokenizer, model): the base model, with the global adapter applied when given."""
    from fedit.models.adapters import load_saved_adapter
    from fedit.models.loading import load_model, load_tokenizer

    if adapter is not None:
        check_adapter_dir(adapter)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if adapter is not None:
        model = load_saved_adapter(model, adapter)
    model.eval()
    return tokenizer, model
