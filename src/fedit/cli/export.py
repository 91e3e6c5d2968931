"""`fedit export`: merge a global adapter into the base weights (W0 + s·BA) and save."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedit.cli.common import (
    AdapterOption,
    ConfigOption,
    OverrideOption,
    console,
    friendly_errors,
    resolve_config,
)
from fedit.models.inference import load_for_inference


@friendly_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Directory for the standalone model")],
    adapter: AdapterOption = None,
    config: ConfigOption = None,
    set_: OverrideOption = None,
) -> None:
    """Write a standalone Hugging Face model with the adapter merged in."""
    if adapter is None:
        raise FileNotFoundError("--adapter is required: the round directory to merge")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory")
    cfg = resolve_config(config, set_, adapter)
    tokenizer, model = load_for_inference(cfg, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    console.print(f"merged model written to {out}")
