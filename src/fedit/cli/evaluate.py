"""`fedit eval`: held-out loss and perplexity per category, for the base model or an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from fedit.cli.common import (
    AdapterOption,
    ConfigOption,
    OverrideOption,
    console,
    friendly_errors,
    resolve_config,
)
from fedit.config import ConfigError


@friendly_errors
def evaluate(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    adapter: AdapterOption = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Records to score (default: the config's held-out set)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the scores as JSON")] = None,
) -> None:
    """Held-out loss / perplexity per category (base model when no --adapter)."""
    from fedit.data.prepare import load_heldout
    from fedit.data.readers import read_records
    from fedit.engine.federation_data import scoring_examples
    from fedit.eval.loss import heldout_loss
    from fedit.models.inference import load_for_inference

    cfg = resolve_config(config, set_, adapter)
    records = read_records(str(data), cfg.data.fields) if data else load_heldout(cfg)
    if not records:
        raise ConfigError(
            "no records to score: the config holds none out (data.heldout_per_category = 0, "
            "no data.heldout_path); pass --data FILE"
        )
    tokenizer, model = load_for_inference(cfg, adapter)
    examples = scoring_examples(cfg, tokenizer, records, "no records to score")
    scores = heldout_loss(model, examples, tokenizer.pad_token_id, cfg.eval.batch_size)
    table = Table(title=Text(f"held-out loss: {adapter or 'base model'}"))
    for column in ("category", "loss", "perplexity", "tokens"):
        table.add_column(column)
    for category, row in scores.items():
        table.add_row(
            Text(category), f"{row['loss']:.4f}", f"{row['perplexity']:.2f}", str(row["tokens"])
        )
    console.print(table)
    if out:
        out.write_text(json.dumps(scores, indent=2))
        console.print(f"scores written to {out}", markup=False)
